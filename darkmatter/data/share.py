"""Use another experiment's model, corpus or activations instead of making them again (``share_data_from``).

An experiment that differs from another only after the harvest (other SAE families, other training budgets) can
take that run's data folders: each is hard-linked file by file (copied where links are impossible, e.g. across
file systems), so sharing costs no disk and no time. The folder is shared only if the settings it was made with
(its ``provenance.json`` params) equal this experiment's slice for the step; a key the other run's params lack
(added to the package after it ran) must hold its default here. Every step writes its outputs under a new name and
renames them into place, so a linked file is never written through.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from darkmatter.io import InputError, atomic_dir, read_json, write_json
from darkmatter.provenance import write_provenance

MODEL_JSON = "model.json"  # rewritten, not linked: it names the model's folder
# Snakemake's marker in a directory output, touched when its job ends: a link would make the source experiment's
# folder look newer than everything made from it (and rerun all of that)
NEVER_LINKED = (".snakemake_timestamp",)


def differences(ours: Any, theirs: Any, defaults: Any, key: str = "") -> list[str]:
    """The dotted keys where ``theirs`` (a run's recorded params) disagrees with ``ours``; a key ``theirs`` lacks
    is compared with ``defaults`` (its value before the key existed). Keys only ``theirs`` has are ignored (the
    step's wildcards, e.g. ``split``)."""
    if isinstance(ours, dict):
        out = []
        for k, v in ours.items():
            sub = f"{key}.{k}" if key else k
            d = defaults.get(k) if isinstance(defaults, dict) else None
            if isinstance(theirs, dict) and k in theirs:
                out += differences(v, theirs[k], d, sub)
            elif v != d:
                out.append(sub)
        return out
    return [] if ours == theirs else [key]


def _link_tree(source: Path, target: Path) -> None:
    for root, _dirs, files in os.walk(source):
        dest = target / Path(root).relative_to(source)
        dest.mkdir(parents=True, exist_ok=True)
        for name in files:
            if name in NEVER_LINKED:
                continue
            try:
                os.link(Path(root) / name, dest / name)
            except OSError:  # another file system, or links not allowed: a copy
                shutil.copy2(Path(root) / name, dest / name)


def share_folder(source: Path, out: Path, params: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Make ``out`` hold the files of the finished step folder ``source`` (hard links), after checking that
    ``source`` was made with ``params`` (raises InputError naming every differing key otherwise).

    A ``model.json`` in it is rewritten to name ``out``'s copy of the model; ``provenance.json`` records the
    sharing and the source's own provenance.
    """
    source, out = Path(source), Path(out)
    started = time.time()
    record = source / "provenance.json"
    if not record.is_file():
        raise InputError(f"{source}: no provenance.json; expected a finished step folder of the experiment to "
                         "share data from (run that experiment first).")
    theirs = read_json(record)
    diff = differences(params, theirs.get("params") or {}, defaults)
    if diff:
        raise InputError(f"{source} was made with different settings ({', '.join(diff)}) than this experiment's; "
                         "share_data_from needs equal model, corpus and harvest settings.")
    with atomic_dir(out) as tmp:
        _link_tree(source, tmp)
        if (tmp / MODEL_JSON).exists():
            info = json.loads((tmp / MODEL_JSON).read_text())
            (tmp / MODEL_JSON).unlink()  # a link to the source's file: never written through
            if info.get("path") and Path(info["path"]).is_relative_to(source):
                info["path"] = str(out / Path(info["path"]).relative_to(source))
            write_json(tmp / MODEL_JSON, info)
        (tmp / "provenance.json").unlink()
        write_provenance(tmp, params, started=started, extra={"shared_from": str(source), "source_provenance": theirs})
