"""The experiment's self-contained HTML report and token browser, assembled from the analyses and the store."""

from darkmatter.report.browser import BrowserLimits
from darkmatter.report.render import render_report

__all__ = ["BrowserLimits", "render_report"]
