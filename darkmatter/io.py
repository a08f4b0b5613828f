"""Crash-safe file output (everything is written under a temporary name and renamed into place), content digests,
and the error raised when an input does not fit what a step expects."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """An input (file, array, SAE) does not fit what the step expects; the message names it and what was expected."""


def check_finite(rows: Any, start: int, where: str, ids: Any = None) -> None:
    """Raise InputError naming the first row of ``rows`` [n, d] (an array or a CPU tensor; rows ``start``, ``start``
    + 1, … of ``where``, or the row numbers ``ids``) that holds a NaN or an infinity. A NaN would otherwise flow
    silently into every code, metric and fit after it; the steps call this on rows they read anyway (one cheap
    pass)."""
    import numpy as np

    finite = np.isfinite(np.asarray(rows)).all(1)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        row = int(ids[first]) if ids is not None else start + first
        raise InputError(f"{where}: row {row} holds NaN or infinite values; expected finite activations.")


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


def sha256(path: Path) -> str:
    """The sha256 hex digest of a file's bytes (streamed, not read whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_sha256(files: list[Path], base: Path) -> str:
    """One sha256 over ``files`` (each one's path relative to ``base`` and its content, in the order given)."""
    h = hashlib.sha256()
    for path in files:
        h.update(f"{Path(path).relative_to(base).as_posix()}\0{sha256(path)}\n".encode())
    return h.hexdigest()


def tree_sha256(folder: Path) -> str:
    """One sha256 over every file under ``folder``, in sorted order: equal for two folders exactly when they hold
    the same files with the same bytes."""
    return files_sha256(sorted(p for p in Path(folder).rglob("*") if p.is_file()), Path(folder))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (:func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable JSON file ({e}); rerun the step that writes it.") from None


# Readers of the binary formats a step consumes. A truncated or corrupted file (a killed copy, a full disk, a
# foreign file under an expected name) raises InputError naming it, instead of the format library's own message,
# which never names the file. A missing file stays FileNotFoundError.


def load_npy(path: Path, mmap: bool = False) -> Any:
    """A ``.npy`` array (memmapped read-only with ``mmap``); never unpickles (``allow_pickle=False``)."""
    import numpy as np

    try:
        with open(path, "rb") as f:  # np.load takes any other file for a pickle and says so, misleadingly
            if f.read(6) != b"\x93NUMPY":
                raise InputError(f"{path}: not a .npy array (no NumPy header); rerun the step that writes it.")
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (FileNotFoundError, InputError):
        raise
    except (ValueError, EOFError, OSError) as e:
        raise InputError(f"{path}: not a readable .npy array ({e}); rerun the step that writes it.") from None


def load_safetensors(path: Path, device: str = "cpu", numpy: bool = False) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file (torch tensors on ``device``; numpy arrays with ``numpy``)."""
    from safetensors import SafetensorError
    from safetensors import numpy as st_numpy
    from safetensors import torch as st_torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        return st_numpy.load_file(str(path)) if numpy else st_torch.load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: not a readable .safetensors file ({e}); rerun the step that writes it.") from None


def read_parquet(path: Path, **kwargs: Any) -> Any:
    """A Parquet file as a polars DataFrame (``kwargs``: e.g. ``columns``)."""
    import polars as pl

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        return pl.read_parquet(path, **kwargs)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e}); rerun the step that writes it.") from None
