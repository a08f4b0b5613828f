"""Pretrained SAEs as family members: what a family's ``source`` names, described without loading weights, and
imported into the experiment.

A family with ``source`` lists SAEs trained elsewhere: folders or files in any format :mod:`darkmatter.sae.formats`
reads (a folder holding several SAEs stands for all of them), or ``sae_lens:<release>:<id>``. Each becomes a
member with an ordinary sae_id ``{architecture}-w{d_sae}-k{k}-s0``, so every later step treats it exactly like
a trained SAE. The workflow needs the sae_ids before any job runs, so they are read from the files' headers
(cfg.json, the safetensors header, the ``.npy`` header inside a Gemma Scope ``params.npz``), never from the weights:

- width: the encoder's shape;
- k: a TopK SAE's ``k``; for an SAE without a fixed k (JumpReLU, ReLU) the L0 its name or cfg states
  (``average_l0_82`` as Gemma Scope and most releases name them; cfg ``average_l0``/``l0``);
- ``sae_lens:`` sources are not on disk before the import step downloads them, so their width and L0 come from
  the family's ``widths`` and ``ks`` (one each per source, in order) and the import checks them.
"""

from __future__ import annotations

import functools
import logging
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from darkmatter.sae.formats import (
    GEMMA_SCOPE_WEIGHTS,
    SAELENS_PREFIX,
    SAELENS_WEIGHTS,
    SPARSIFY_WEIGHTS,
    SaeFormatError,
    detect_format,
    find_saes,
    load_sae,
    read_cfg_json,
)

log = logging.getLogger(__name__)

L0_LABEL = re.compile(r"(?:^|[/_\-])l0[_\-]?(\d+)(?:$|[/_\-.])")


def expand_sources(sources: Sequence[str]) -> list[str]:
    """Every SAE the ``sources`` name, in order: a folder of several SAEs becomes each of them (sorted paths)."""
    out: list[str] = []
    for source in sources:
        if source.startswith(SAELENS_PREFIX):
            out.append(source)
            continue
        found = find_saes(source)
        if not found:
            raise SaeFormatError(f"source {source!r} holds no SAE this package can read (a Gemma Scope params.npz, a "
                                 "sparsify folder, or a SAELens/darkmatter folder), or does not exist.")
        out.extend(str(p) for p in found)
    return out


def _l0_label(text: str) -> int | None:
    """The L0 a path states (``.../average_l0_82/params.npz`` → 82); the last one, nearest the file, wins."""
    found = L0_LABEL.findall(text.lower())
    return int(found[-1]) if found else None


def _npy_shape(npz: Path, name: str) -> tuple[int, ...]:
    """The shape of array ``name`` in an ``.npz`` archive, read from its header (the data stays on disk)."""
    try:
        with zipfile.ZipFile(npz) as archive, archive.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            shape, _, _ = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(f))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise SaeFormatError(f"{npz}: cannot read the header of {name} ({e}).") from None
    return tuple(shape)


def _safetensors_shape(file: Path, names: Sequence[str]) -> tuple[int, ...]:
    try:
        with safe_open(str(file), framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if name in present:
                    return tuple(f.get_slice(name).get_shape())
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise SaeFormatError(f"{file}: not a readable safetensors file ({e}).") from None
    raise SaeFormatError(f"{file}: has none of the tensors {list(names)}.")


@functools.cache
def describe(source: str) -> tuple[str, int, int | None]:
    """(architecture, d_sae, k) of a local SAE from its headers; k is None when neither the SAE nor its name
    states one. Raises :class:`SaeFormatError` for anything unreadable. Remembered per process: the workflow
    expands the families once per job's resource estimate, and the headers do not change during a run."""
    path = Path(source)
    fmt = detect_format(path)
    if fmt == "gemma_scope":
        file = path / GEMMA_SCOPE_WEIGHTS if path.is_dir() else path
        names = np.load(file, allow_pickle=False).files  # the archive's directory only
        enc = "W_enc" if "W_enc" in names else "w_enc"
        return "jumprelu", _npy_shape(file, enc)[1], _l0_label(file.as_posix())
    if fmt == "sparsify":
        cfg = read_cfg_json(path / "cfg.json")
        return "topk", _safetensors_shape(path / SPARSIFY_WEIGHTS, ["encoder.weight"])[0], cfg.get("k")
    if fmt == "saelens":
        cfg = read_cfg_json(path / "cfg.json")
        meta = cfg.get("metadata") or {}
        d_sae = _safetensors_shape(path / SAELENS_WEIGHTS, ["W_enc"])[1]
        if cfg.get("activation_fn") == "topk" or cfg.get("activation_fn_str") == "topk":
            return "topk", d_sae, cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        from darkmatter.sae.architectures import architecture

        try:
            arch = architecture(cfg.get("architecture", "standard")).name
        except ValueError as e:
            raise SaeFormatError(f"{path}: {e}") from None
        k = cfg.get("k")  # darkmatter writes its sparsity target for every architecture
        for key in ("average_l0", "l0"):
            k = k if k is not None else meta.get(key, cfg.get(key))
        return arch, d_sae, k if k is not None else _l0_label(path.as_posix())
    raise SaeFormatError(f"{source} is not an SAE this package can read.")


def source_members(sources: Sequence[str], architecture: str, widths: Sequence[int],
                   ks: Sequence[int]) -> list[tuple[str, int, int, str]]:
    """(architecture, d_sae, k, source) of every SAE a family's ``source`` names; ``sae_lens:`` sources take
    ``architecture`` and, in order, one of ``widths`` and ``ks`` each (see the module docstring)."""
    every = expand_sources(sources)
    remote = [s for s in every if s.startswith(SAELENS_PREFIX)]
    if remote and not (len(widths) == len(ks) == len(remote)):
        raise SaeFormatError(f"{len(remote)} sae_lens sources need as many widths and ks (their d_sae and L0, in "
                             f"order), got widths {list(widths)} and ks {list(ks)}.")
    labels = iter(zip(widths, ks, strict=False))
    out = []
    for source in every:
        if source.startswith(SAELENS_PREFIX):
            arch, (d_sae, k) = architecture, next(labels)
        else:
            arch, d_sae, k = describe(source)
        if k is None:
            raise SaeFormatError(f"cannot tell the L0 of {arch} SAE {source}: name its folder or file with "
                                 "'l0_<n>' (e.g. average_l0_82) or give its cfg.json an 'average_l0'.")
        out.append((arch, int(d_sae), int(round(k)), source))
    return out


def import_sae(source: str, out: Path, hook: str, d_model: int, expected: tuple[str, int, int],
               params: Any = None) -> None:
    """The ``import_sae`` step: load ``source`` (downloading a ``sae_lens:`` one), check it fits ``hook`` and the
    member it was described as (``expected`` = architecture, d_sae, k; loading refuses non-finite weights), and
    write it to ``out`` in the darkmatter/SAELens layout with provenance, atomically."""
    import time

    from darkmatter.io import atomic_dir
    from darkmatter.provenance import write_provenance
    from darkmatter.sae.model import write_sae_files

    started = time.time()
    sae = load_sae(source)
    arch, d_sae, k = expected
    if sae.d_in != d_model:
        raise SaeFormatError(f"SAE {source} has d_in={sae.d_in} but hook {hook} has d_model={d_model}.")
    got_k = sae.cfg.get("k") if sae.architecture in ("topk", "batchtopk") else k
    if (sae.architecture, sae.d_sae, got_k) != (arch, d_sae, k):
        raise SaeFormatError(f"SAE {source} is a {sae.architecture} SAE with d_sae={sae.d_sae}, k={got_k}; the family "
                             f"described it as {arch} with d_sae={d_sae}, k={k} (check the family's widths and ks).")
    if sae.cfg.get("hook_name") not in (None, hook):
        # the user decides which hook an SAE reads; a different stated hook is worth a look, not an error
        log.warning("SAE %s states hook %s but is imported on %s", source,
                                            sae.cfg["hook_name"], hook)
    with atomic_dir(out) as tmp:
        write_sae_files(sae, tmp)
        write_provenance(tmp, params, started=started, extra={"source": source, "hook": hook})
