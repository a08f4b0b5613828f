"""SAE identifiers and family expansion: the one place where an ``sae_id`` is built or parsed.

An sae_id names one trained SAE on one hook: ``{architecture}-w{d_sae}-k{k}-s{seed}``, e.g. ``topk-w8192-k32-s0``,
with ``-t{tokens}`` appended when its family sets its own training budget (``topk-w4096-k32-s0-t8M``: 8M
token-steps instead of the experiment's ``training.tokens``).
``k`` is the sparsity target: exact L0 for ``topk``, mean L0 for ``batchtopk``, the target of the L0 loss for
``jumprelu`` and of the L1 coefficient controller for ``relu`` (see darkmatter.sae.objectives).

An experiment's ``families`` are grids (architecture × widths × ks × seeds) on a hook, or SAEs trained elsewhere
(a ``source``: darkmatter.sae.sources, imported instead of trained, with sae_ids read from their files);
:func:`expand_families` turns them into unique members, so an SAE that belongs to two families (the 4096-wide
k=32 TopK SAE sits in both the width and the k family of the default experiment) is trained once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from darkmatter.config import SaeFamilyConfig
from darkmatter.sae.architectures import ARCHITECTURES

SAE_ID_RE = re.compile(r"^(?P<architecture>[a-z]+)-w(?P<d_sae>[1-9][0-9]*)-k(?P<k>[1-9][0-9]*)-s(?P<seed>[0-9]+)"
                       r"(?:-t(?P<tokens>[1-9][0-9]*)(?P<unit>[kM]?))?$")
UNITS = {"": 1, "k": 10**3, "M": 10**6}


def tokens_label(tokens: int) -> str:
    """``8M`` for 8,000,000, ``500k`` for 500,000, the digits otherwise (the inverse of the sae_id's ``-t`` part)."""
    for unit in ("M", "k"):
        if tokens % UNITS[unit] == 0:
            return f"{tokens // UNITS[unit]}{unit}"
    return str(tokens)


@dataclass(frozen=True, order=True)
class SaeSpec:
    """What distinguishes one trained SAE from another on the same hook and data."""

    architecture: str
    d_sae: int
    k: int
    seed: int
    tokens: int | None = None  # training token-steps; None: the experiment's training.tokens

    @property
    def sae_id(self) -> str:
        budget = f"-t{tokens_label(self.tokens)}" if self.tokens is not None else ""
        return f"{self.architecture}-w{self.d_sae}-k{self.k}-s{self.seed}{budget}"


def sae_id(architecture: str, d_sae: int, k: int, seed: int, tokens: int | None = None) -> str:
    """``topk-w8192-k32-s0`` (``…-t8M`` with a budget); raises ValueError for an unknown architecture or
    non-positive sizes."""
    spec = SaeSpec(architecture, int(d_sae), int(k), int(seed), None if tokens is None else int(tokens))
    parse_sae_id(spec.sae_id)  # validates
    return spec.sae_id


def parse_sae_id(text: str) -> SaeSpec:
    """The inverse of :func:`sae_id` (raises ValueError naming the expected form)."""
    m = SAE_ID_RE.match(text)
    if m is None or m["architecture"] not in ARCHITECTURES:
        raise ValueError(f"invalid sae_id {text!r}; expected '<architecture>-w<width>-k<k>-s<seed>[-t<tokens>]' with "
                         f"architecture one of {', '.join(ARCHITECTURES)}, e.g. 'topk-w8192-k32-s0' or "
                         "'topk-w4096-k32-s0-t500k'.")
    tokens = None if m["tokens"] is None else int(m["tokens"]) * UNITS[m["unit"]]
    spec = SaeSpec(m["architecture"], int(m["d_sae"]), int(m["k"]), int(m["seed"]), tokens)
    if spec.sae_id != text:  # one name per SAE: the budget in its largest exact unit
        raise ValueError(f"invalid sae_id {text!r}; this SAE is written {spec.sae_id!r}.")
    return spec


@dataclass(frozen=True)
class SaeMember:
    """One SAE of the experiment: its spec, the hook it reads, the families that contain it, and where it comes
    from when it is imported rather than trained (a path or ``sae_lens:<release>:<id>``)."""

    hook: str
    spec: SaeSpec
    families: tuple[str, ...]
    source: str | None = None

    @property
    def sae_id(self) -> str:
        return self.spec.sae_id

    @property
    def path(self) -> str:
        """Location relative to ``results/<exp>/saes/``: ``<hook>/<sae_id>``."""
        return f"{self.hook}/{self.sae_id}"


def expand_families(families: Sequence[SaeFamilyConfig], primary_hook: str) -> list[SaeMember]:
    """Unique members of every family (trained grids and imported ``source`` SAEs); a family without a hook is on
    ``primary_hook``. An imported SAE whose sae_id equals another member's on its hook is refused (ValueError):
    one sae_id names one SAE.

    Order: first appearance in the config (families in order, then widths × ks × seeds, or sources in order), so
    runs are stable.
    """
    members: dict[tuple[str, SaeSpec], list[str]] = {}
    sources: dict[tuple[str, SaeSpec], str] = {}
    for fam in families:
        hook = fam.hook or primary_hook
        if fam.source:
            from darkmatter.sae.sources import source_members  # reads the SAEs' headers

            for arch, d_sae, k, source in source_members(fam.source, fam.architecture, fam.widths, fam.ks):
                key = (hook, SaeSpec(arch, d_sae, k, 0))
                parse_sae_id(key[1].sae_id)  # validates
                if key in members and sources.get(key) != source:
                    raise ValueError(f"{source} would be {key[1].sae_id} on {hook}, which names another SAE of the "
                                     "experiment already; an sae_id names one SAE.")
                sources[key] = source
                members.setdefault(key, []).append(fam.name)
            continue
        for width in fam.widths:
            for k in fam.ks:
                for seed in fam.seeds:
                    key = (hook, SaeSpec(fam.architecture, width, k, seed, fam.tokens))
                    if key in sources:
                        raise ValueError(f"{sources[key]} is {key[1].sae_id} on {hook}, which family {fam.name!r} "
                                         "also trains; an sae_id names one SAE.")
                    names = members.setdefault(key, [])
                    if fam.name not in names:
                        names.append(fam.name)
    return [SaeMember(hook, spec, tuple(names), sources.get((hook, spec))) for (hook, spec), names in members.items()]


def widest(members: Sequence[SaeMember]) -> SaeMember:
    """The member with the most latents (the sparsest, then the lowest seed, among equals): the one SAE of a hook
    that the single-SAE experiments (the pursuit's CE) study."""
    if not members:
        raise ValueError("no SAEs to choose the widest from.")
    return min(members, key=lambda m: (-m.spec.d_sae, m.spec.k, m.spec.seed))


def error_sae_base(members: Sequence[SaeMember], base: str | None, k: int) -> SaeMember:
    """The SAE whose error components the error SAEs learn: ``base`` by sae_id, else the widest member with
    ``k`` active latents, else the widest."""
    if base is not None:
        return next(m for m in members if m.sae_id == base)
    return widest([m for m in members if m.spec.k == k] or list(members))
