"""Loaded by every Python process of a kill run of bench.faults (this folder is put first on PYTHONPATH).

When ``DARKMATTER_FAULTS_RENAME_TO`` names a file or folder, the process that is about to rename something onto it
(the atomic write's last act: os.rename / os.replace raise the audit event "os.rename") writes the marker file
``DARKMATTER_FAULTS_MARKER`` and sleeps, so the harness can SIGKILL it with its output fully written under the
temporary name and not yet in place: the latest moment of a final write. Without the variable it does nothing.
"""

import os
import sys
import time

_TARGET = os.environ.get("DARKMATTER_FAULTS_RENAME_TO")
_MARKER = os.environ.get("DARKMATTER_FAULTS_MARKER")


def _pause_before_final_rename(event, args):
    if event != "os.rename" or len(args) < 2:
        return
    try:
        dst = os.path.abspath(os.fsdecode(args[1]))
    except TypeError:  # a file descriptor, not a path
        return
    if dst == _TARGET:
        with open(_MARKER, "w") as f:
            f.write(f"{os.getpid()} {os.fsdecode(args[0])}\n")
        while True:  # the harness kills the whole process tree now
            time.sleep(1)


if _TARGET and _MARKER:
    sys.addaudithook(_pause_before_final_rename)
