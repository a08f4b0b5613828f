"""Crash-safe output (darkmatter.io): the temporaries a killed writer leaves are removed by the next writer."""

from __future__ import annotations

import os
import subprocess
import sys

from darkmatter.io import atomic_dir, atomic_file, write_text


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_next_write_removes_a_killed_writers_temporaries(tmp_path):
    dead = _dead_pid()
    live = os.getppid()  # running, and not us: its temporary may still be being written
    (tmp_path / f".out.tmp-{dead}").mkdir()
    (tmp_path / f".out.tmp-{dead}" / "half.npy").write_bytes(b"\0" * 100)
    (tmp_path / f".out.tmp-{live}").mkdir()
    (tmp_path / f".db.duckdb.tmp-{dead}").write_bytes(b"x")
    (tmp_path / f".db.duckdb.tmp-{dead}.wal").write_bytes(b"x")  # DuckDB's log beside its file
    (tmp_path / f".other.tmp-{dead}").write_bytes(b"x")  # another output's: not ours to judge
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
    with atomic_file(tmp_path / "db.duckdb") as tmp:
        tmp.write_bytes(b"db")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".other.tmp-{dead}", f".out.tmp-{live}", "db.duckdb", "out"])
    assert (tmp_path / "out" / "a.txt").read_text() == "a" and (tmp_path / "db.duckdb").read_bytes() == b"db"


def test_a_failed_write_leaves_the_previous_output(tmp_path):
    write_text(tmp_path / "f.txt", "old")
    try:
        with atomic_file(tmp_path / "f.txt") as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"] and (tmp_path / "f.txt").read_text() == "old"
