"""A network guard for test subprocesses: put this folder on PYTHONPATH and name a log file in
$DARKMATTER_NETGUARD_LOG, and every Python process started with that environment (Snakemake and each step it runs)
refuses to open an internet connection or resolve a host name, and appends one line per attempt to the log.

Python imports ``sitecustomize`` at start-up from the first folder on sys.path that has one, so the guard needs no
change to the code under test. Without $DARKMATTER_NETGUARD_LOG it does nothing. Unix sockets (local IPC) stay
allowed; the test asserts that the log is empty afterwards.
"""

from __future__ import annotations

import os
import socket
import sys

LOG = os.environ.get("DARKMATTER_NETGUARD_LOG")


def _refuse(what: str, target: object) -> None:
    with open(LOG, "a", encoding="utf-8") as f:  # type: ignore[arg-type]
        f.write(f"pid {os.getpid()} {' '.join(sys.argv)[:200]!r}: {what} {target!r}\n")
    raise OSError(f"network access is blocked in this test ({what} {target!r})")


if LOG:
    _connect, _connect_ex, _sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto

    def _is_inet(sock: socket.socket) -> bool:
        return sock.family in (socket.AF_INET, socket.AF_INET6)

    def connect(self: socket.socket, address: object) -> None:
        if _is_inet(self):
            _refuse("connect", address)
        return _connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        if _is_inet(self):
            _refuse("connect_ex", address)
        return _connect_ex(self, address)

    def sendto(self: socket.socket, *args: object) -> int:
        if _is_inet(self):
            _refuse("sendto", args[-1])
        return _sendto(self, *args)  # type: ignore[arg-type]

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
        _refuse("getaddrinfo", host)
        return []

    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
    socket.getaddrinfo = getaddrinfo
