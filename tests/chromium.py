"""A minimal headless-Chromium driver over the Chrome DevTools Protocol, for the report's browser tests.

It speaks CDP through ``--remote-debugging-pipe`` (NUL-separated JSON on file descriptors 3 and 4), so it
needs no extra Python package, no chromedriver and no TCP port. Only what the tests use is implemented:
open a page, evaluate JavaScript, click at an element's centre with real mouse events, take screenshots,
and collect console messages, exceptions and network requests.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import itertools
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

# Without these flags headless Chromium tries to reach the network (updates, sync, background requests).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars",
         "--mute-audio", "--disable-extensions", "--disable-default-apps")
INSTALL_HINT = "install it with `apt-get update && apt-get install -y chromium` (Debian) or set $CHROMIUM"


def find_chromium() -> str | None:
    """The Chromium executable: $CHROMIUM, else the first of the usual names on PATH."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)


class CdpError(RuntimeError):
    """Chromium answered a command with an error, or did not answer in time."""


class Chromium:
    """One headless Chromium process with one page; use as a context manager."""

    def __init__(self, binary: str, profile: Path, width: int = 1280, height: int = 900) -> None:
        # Chromium reads commands from fd 3 and writes replies to fd 4 of its own process. The child ends are
        # first duplicated above fd 9 (close-on-exec), so that moving them onto 3 and 4 never clobbers one another.
        cmd_read, self._cmd_write = os.pipe()
        self._reply_read, reply_write = os.pipe()
        hi_cmd = fcntl.fcntl(cmd_read, fcntl.F_DUPFD_CLOEXEC, 10)
        hi_reply = fcntl.fcntl(reply_write, fcntl.F_DUPFD_CLOEXEC, 10)

        def child_fds() -> None:  # runs in the child between fork and exec; dup2 leaves 3 and 4 inheritable
            os.dup2(hi_cmd, 3)
            os.dup2(hi_reply, 4)

        self.log = profile / "chromium.log"
        profile.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:  # a file, not a pipe: nobody would drain a pipe and Chromium would block
            # close_fds=False: fds 3 and 4 must survive; Python's own fds are close-on-exec anyway.
            self.proc = subprocess.Popen(
                [binary, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
                 f"--window-size={width},{height}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=False, preexec_fn=child_fds,
            )
        for fd in (cmd_read, reply_write, hi_cmd, hi_reply):
            os.close(fd)
        self._ids = itertools.count(1)
        self._replies: dict[int, dict[str, Any]] = {}
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._lock = threading.Condition()
        self.console: list[dict[str, Any]] = []  # console messages, log entries and uncaught exceptions
        self.requests: list[str] = []  # every URL the page asked for
        threading.Thread(target=self._reader, daemon=True).start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    # ------------------------------------------------------------------ protocol plumbing

    def _reader(self) -> None:
        buf = b""
        while chunk := os.read(self._reply_read, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if "id" in msg:
                    with self._lock:
                        self._replies[msg["id"]] = msg
                        self._lock.notify_all()
                else:
                    self._on_event(msg)

    def _on_event(self, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append({"level": params.get("type"), "text": text})
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            self.console.append({"level": "exception", "text": text})
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append({"level": entry.get("level"), "text": entry.get("text")})
        elif method == "Network.requestWillBeSent":
            self.requests.append(params.get("request", {}).get("url", ""))
        self._events.put(msg)

    def send(self, method: str, session: str | None = None, timeout: float = 30, **params: Any) -> dict[str, Any]:
        """Send one CDP command and wait for its reply."""
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_write, json.dumps(msg).encode() + b"\0")
        with self._lock:
            if not self._lock.wait_for(lambda: msg_id in self._replies, timeout=timeout):
                raise CdpError(f"{method}: no reply within {timeout} s")
            reply = self._replies.pop(msg_id)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """A command addressed to the page."""
        return self.send(method, session=self.session, **params)

    # ------------------------------------------------------------------ what the tests use

    def open(self, url: str, timeout: float = 30) -> float:
        """Navigate and wait for the load event; returns the wall-clock seconds it took."""
        while not self._events.empty():
            self._events.get_nowait()
        started = time.perf_counter()
        self.call("Page.navigate", url=url)
        deadline = started + timeout
        while time.perf_counter() < deadline:
            try:
                event = self._events.get(timeout=max(deadline - time.perf_counter(), 0.01))
            except queue.Empty:
                break
            if event.get("method") == "Page.loadEventFired":
                return time.perf_counter() - started
        raise CdpError(f"{url} did not finish loading within {timeout} s")

    def js(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page and return its value (JSON-able)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CdpError(f"JavaScript error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """Scroll the first element matching ``selector`` into view and click its centre with the mouse."""
        box = self.js(f"""(() => {{ const el = document.querySelector({json.dumps(selector)});
            if (!el) return null; el.scrollIntoView({{block: 'center'}});
            const r = el.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        if box is None:
            raise CdpError(f"no element matches {selector!r}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def press(self, key: str) -> None:
        """Type one printable key into the page (keydown with its text, then keyup)."""
        self.call("Input.dispatchKeyEvent", type="keyDown", key=key, text=key)
        self.call("Input.dispatchKeyEvent", type="keyUp", key=key)

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """Save a PNG of the viewport, or of the whole page."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            w, h = self.js("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params |= {"captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}}
        data = self.call("Page.captureScreenshot", **params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(CdpError, OSError):  # already gone is fine
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_write)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
