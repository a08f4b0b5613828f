"""A small synthetic but complete experiment folder for the analysis tests, made by the real pipeline steps.

Activations are a planted sparse code: x = b + Σ_{i active} m_i·(1 + jitter·ε)·d_i + (per-context shift) + noise,
with exactly ``k_true`` features active per token, drawn with Zipf frequencies (feature 0 the most frequent), unit
feature directions d_i (orthonormal when ``n_features`` ≤ the signal rank, else random unit vectors in a subspace
of that rank) and fixed per-feature magnitudes m_i ~ U[1, 2]. The SAEs are TopK SAEs built, not trained, from
the truth: width w decodes with the w most frequent features (W_dec = d_1..d_w, W_enc = W_decᵀ, b_dec = b), so
wider SAEs miss fewer features and FVU falls with width as in a real sweep. Extra SAEs (e.g. one whose error is a
planted linear map of x) can be added. Then the real steps run: ``darkmatter.measure.measure_errors`` (x_hat,
b*, token_errors, summary), ``darkmatter.evaluate.evaluate_to_file`` and ``darkmatter.store.build_database``.

Layout (as the workflow writes it): ``<root>/results/activations/eval/{<hook>.npy, index.parquet, meta.json}``,
``results/saes/<hook>/<sae_id>/``, ``results/errors/<hook>/<sae_id>/``, ``results/metrics/<hook>/<sae_id>.json``
and ``results/darkmatter.duckdb``. Building the default experiment takes about a second.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from darkmatter.analysis.contract import AnalysisContext, load_outputs, run
from darkmatter.config import DecompositionConfig
from darkmatter.errors.evaluate import evaluate_to_file
from darkmatter.sae.families import SaeMember, SaeSpec
from darkmatter.io import write_json
from darkmatter.errors.measure import measure_errors
from darkmatter.sae.model import Sae, default_cfg, save_sae
from darkmatter.store.build import build_database
from darkmatter.store.tables import saes_table

HOOK = "blocks.1.hook_resid_post"
MIN_POS = 8


@dataclass(frozen=True)
class Planted:
    """The ground truth: features [n_features, d] (unit rows), magnitudes [n_features], bias [d], active [N, k_true]
    feature ids per token, x [N, d] float32 as stored, contexts [N]."""

    features: np.ndarray
    magnitudes: np.ndarray
    bias: np.ndarray
    active: np.ndarray
    x: np.ndarray
    contexts: np.ndarray


@dataclass(frozen=True)
class Experiment:
    """A built experiment: ``run(name, out)`` runs ``analyses.<name>`` through the real runner and reads it back."""

    results: Path
    db: Path
    hook: str
    sae_ids: list[str]
    params: dict[str, Any]
    planted: Planted
    saes: dict[str, Sae] = field(repr=False)

    def context(self, **params: Any) -> AnalysisContext:
        return AnalysisContext(self.db, self.params | params)

    def run(self, name: str, out: Path, **params: Any) -> dict[str, Any]:
        with torch_threads(1):
            run(importlib.import_module(f"analyses.{name}"), self.context(**params), out)
        return load_outputs(out)


def topk_sae(features: np.ndarray, bias: np.ndarray, k: int) -> Sae:
    """A TopK SAE that decodes with ``features`` [w, d] (W_enc = W_decᵀ, b_enc = 0, b_dec = ``bias``)."""
    w, d = features.shape
    W_dec = torch.as_tensor(features, dtype=torch.float32)
    return Sae.from_tensors(default_cfg("topk", d, w, k, hook_name=HOOK), {
        "W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(w), "W_dec": W_dec,
        "b_dec": torch.as_tensor(bias, dtype=torch.float32)})


def linear_sae(B: np.ndarray) -> Sae:
    """A ReLU "SAE" with Sae(x) = x·B exactly (latents relu(x), relu(−x); W_dec = [B; −B]), so its error is the
    planted linear map x·(I − B)."""
    d = B.shape[0]
    eye, Bt = torch.eye(d), torch.as_tensor(B, dtype=torch.float32)
    return Sae.from_tensors(default_cfg("relu", d, 2 * d, hook_name=HOOK), {
        "W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * d), "W_dec": torch.cat([Bt, -Bt], 0),
        "b_dec": torch.zeros(d)})


def _features(rng: np.random.Generator, n: int, d: int, rank: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    basis = q[:, :rank].T  # [rank, d] orthonormal rows: the signal subspace
    if n <= rank:
        return basis[:n].copy()
    f = rng.standard_normal((n, rank)) @ basis
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def planted_activations(rng: np.random.Generator, *, d_in: int, n_contexts: int, n_positions: int,
                        n_features: int, k_true: int, signal_rank: int | None, magnitude_jitter: float,
                        noise: float, context_shift: float) -> Planted:
    """Draw the planted activations described in the module docstring."""
    n = n_contexts * n_positions
    features = _features(rng, n_features, d_in, signal_rank or d_in)
    magnitudes = rng.uniform(1.0, 2.0, n_features)
    zipf = np.log((np.arange(n_features) + 1.0) ** -0.8)
    # Gumbel top-k: k_true distinct features per token with probabilities ∝ Zipf weights (sampling w/o replacement)
    active = np.argsort(-(zipf + rng.gumbel(size=(n, n_features))), axis=1)[:, :k_true]
    acts = magnitudes[active] * np.maximum(1 + magnitude_jitter * rng.standard_normal(active.shape), 0.05)
    bias = rng.standard_normal(d_in)
    contexts = np.repeat(np.arange(n_contexts), n_positions)
    shifts = context_shift * rng.standard_normal((n_contexts, d_in))
    x = (bias + np.einsum("nk,nkd->nd", acts, features[active]) + shifts[contexts]
         + noise * rng.standard_normal((n, d_in)))
    return Planted(features, magnitudes, bias, active, x.astype(np.float32), contexts)


def _write_store(folder: Path, planted: Planted, n_positions: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True)
    np.save(folder / f"{HOOK}.npy", planted.x)
    n = planted.x.shape[0]
    pl.DataFrame({"row": np.arange(n, dtype=np.int64), "context": planted.contexts.astype(np.int32),
                  "position": np.tile(np.arange(MIN_POS, MIN_POS + n_positions, dtype=np.int32), n // n_positions),
                  "token_id": rng.integers(3, 200, n).astype(np.int32),
                  "loss": rng.uniform(1, 5, n).astype(np.float32)}).write_parquet(folder / "index.parquet")
    write_json(folder / "meta.json", {"hooks": [HOOK], "d_model": {HOOK: planted.x.shape[1]},
                                      "n_contexts": int(planted.contexts.max() + 1),
                                      "context_size": MIN_POS + n_positions, "min_pos": MIN_POS, "rows": n,
                                      "with_loss": True, "dtype": "float32"})


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block. Tiny tensors on a shared 2-core machine run several times
    faster on one thread (measured: the fixture builds in 1 s instead of 6 s) than with a contended pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_experiment(root: Path, *, d_in: int = 48, n_contexts: int = 24, n_positions: int = 100,
                    n_features: int = 96, k_true: int = 3, signal_rank: int | None = None,
                    magnitude_jitter: float = 0.2, noise: float = 0.05, context_shift: float = 0.1,
                    widths: Sequence[int] = (16, 32, 64, 96), width_k: int = 4, ks: Sequence[int] = (2, 4, 8),
                    k_width: int = 32, extra: dict[SaeSpec, tuple[str, Sae]] | None = None,
                    fit_fraction: float = 0.6, seed: int = 0) -> Experiment:
    """Build the experiment under ``root`` (see the module docstring); ``extra`` maps spec → (family, SAE)."""
    with torch_threads(1):
        rng = np.random.default_rng(seed)
        planted = planted_activations(rng, d_in=d_in, n_contexts=n_contexts, n_positions=n_positions,
                                      n_features=n_features, k_true=k_true, signal_rank=signal_rank,
                                      magnitude_jitter=magnitude_jitter, noise=noise, context_shift=context_shift)
        results = root / "results"
        store = results / "activations" / "eval"
        _write_store(store, planted, n_positions, rng)
        grid: dict[SaeSpec, list[str]] = {}
        for w in widths:
            grid.setdefault(SaeSpec("topk", w, width_k, 0), []).append("width")
        for k in ks:
            grid.setdefault(SaeSpec("topk", k_width, k, 0), []).append("k")
        saes = {spec: (fams, topk_sae(planted.features[:spec.d_sae], planted.bias, spec.k)) for spec, fams in grid.items()}
        saes |= {spec: ([fam], sae) for spec, (fam, sae) in (extra or {}).items()}
        n = planted.x.shape[0]
        dc = DecompositionConfig(fit_tokens=int(round(fit_fraction * n)), intercept=True, ridge=0.0, seed=seed)
        members, built = [], {}
        for spec, (fams, sae) in saes.items():
            member = SaeMember(HOOK, spec, tuple(fams))
            save_sae(sae, results / "saes" / member.path)
            measure_errors(results / "saes" / member.path, store, HOOK, results / "errors" / member.path, dc,
                           sae_id=member.sae_id, progress=False)
            evaluate_to_file(results / "saes" / member.path, store, HOOK, results / "metrics" / f"{member.path}.json",
                             progress=False)
            members.append(member)
            built[member.sae_id] = sae
        table = saes_table(members, [results / "metrics" / f"{m.path}.json" for m in members],
                           [results / "errors" / m.path / "summary.json" for m in members], training_tokens=0)
        index = pl.read_parquet(store / "index.parquet")
        tokens = index.with_columns(token_text=pl.format("t{}", pl.col("token_id")),
                                    doc_id=pl.format("doc/{}", pl.col("context")))
        db = build_database(results / "darkmatter.duckdb", tokens, table,
                            [results / "errors" / m.path / "token_errors.parquet" for m in members])
        params = {"results": str(results), "seed": seed, "bootstrap": 40, "confidence": 0.9,
                  "decomposition": {"fit_tokens": dc.fit_tokens, "intercept": dc.intercept, "ridge": dc.ridge,
                                    "seed": dc.seed},
                  "families": [{"name": "width", "architecture": "topk", "widths": list(widths), "ks": [width_k]},
                               {"name": "k", "architecture": "topk", "widths": [k_width], "ks": list(ks)}]}
        return Experiment(results, db, HOOK, [m.sae_id for m in members], params, planted, built)


@pytest.fixture
def experiment_factory(tmp_path_factory) -> Callable[..., Experiment]:
    """Factory fixture: ``experiment_factory(**kwargs)`` builds a fresh :func:`make_experiment` in its own temporary
    folder (keyword arguments as there); e.g. ``experiment_factory(widths=(16, 32, 64, 96))``."""

    def factory(**kwargs: Any) -> Experiment:
        return make_experiment(tmp_path_factory.mktemp("experiment"), **kwargs)

    return factory
