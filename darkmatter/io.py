"""Crash-safe file output (everything is written under a temporary name and renamed into place), and the error
raised when an input does not fit what a step expects."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """An input (file, array, SAE) does not fit what the step expects; the message names it and what was expected."""


def _temporary(final: Path) -> Path:
    """The temporary name of ``final`` for this process, after removing those of processes that no longer run:
    a killed writer (SIGKILL, pre-emption) cannot clean up, and its leftovers can be as large as the output."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.tmp-(\d+)(\..*)?")  # (.wal: DuckDB's log beside its file)
    for stale in final.parent.glob(f".{glob.escape(final.name)}.tmp-*"):
        m = pattern.fullmatch(stale.name)
        if m and int(m.group(1)) != os.getpid() and not _running(int(m.group(1))):
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink(missing_ok=True)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success it replaces ``final`` in one rename.

    An exception (or a kill) leaves ``final`` untouched and no half-written folder under its name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` to write; on success it replaces ``final`` in one rename. An
    exception (or a kill) leaves ``final`` as it was and no temporary file behind."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(final)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (:func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
