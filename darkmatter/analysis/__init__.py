"""What every analysis module shares: the runner and its contract, the context it reads, and common statistics."""

from darkmatter.analysis.context import AnalysisContext
from darkmatter.analysis.contract import load_outputs, run, run_cli

__all__ = ["AnalysisContext", "load_outputs", "run", "run_cli"]
