"""The default report in headless Chromium: file sizes, load time, console errors, network requests, screenshots.

Opens ``reports/<exp>/index.html`` and ``browser.html`` from file:// (tests/chromium.py, the driver of the browser
tests), waits for the load event, and writes full-page screenshots to ``reports/<exp>/screenshots/``. Load times
are medians over ``--repeats`` fresh page loads.

    python -m bench.report [--report reports/default] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from tests.chromium import INSTALL_HINT, Chromium, find_chromium


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", default="reports/default")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    folder = Path(args.report).resolve()
    binary = find_chromium()
    if binary is None:
        raise SystemExit(f"Chromium is not installed; {INSTALL_HINT}.")
    out = {}
    for page in ("index.html", "browser.html"):
        path = folder / page
        if not path.is_file():
            raise SystemExit(f"{path} does not exist; run the workflow first.")
        with tempfile.TemporaryDirectory() as tmp:
            times = []
            for i in range(args.repeats):
                with Chromium(binary, Path(tmp) / f"profile{i}") as chromium:
                    times.append(chromium.open(path.as_uri()))
                    if i == 0:
                        shot = chromium.screenshot(folder / "screenshots" / page.replace(".html", ".png"))
                        errors = [m for m in chromium.console if m.get("level") in ("error", "exception")]
                        remote = [u for u in chromium.requests if not u.startswith(("file:", "data:", "blob:"))]
        out[page] = {"bytes": path.stat().st_size, "load_seconds_median": statistics.median(times),
                     "load_seconds": times, "console_errors": errors, "network_requests": remote,
                     "screenshot": str(shot)}
        print(f"{page}: {path.stat().st_size / 2**20:.2f} MiB, load {statistics.median(times):.2f} s (median of "
              f"{args.repeats}), {len(errors)} console errors, {len(remote)} network requests, screenshot {shot}")
    (folder / "screenshots" / "load.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
