"""Builders shared by the tests: random and planted SAEs, planted activations, activation stores, and two small
experiment folders (one made by the real pipeline steps, one synthetic store for the report).

The pipeline experiment (:func:`make_experiment`) plants a sparse code: x = b + Σ_{i active} m_i·(1 + jitter·ε)·d_i
+ (per-context shift) + noise, with exactly ``k_true`` features active per token, drawn with Zipf frequencies
(feature 0 the most frequent), unit feature directions d_i (orthonormal when ``n_features`` ≤ the signal rank, else
random unit vectors in a subspace of that rank) and fixed per-feature magnitudes m_i ~ U[1, 2]. Its SAEs are TopK SAEs
built, not trained, from the truth: width w decodes with the w most frequent features (W_dec = d_1..d_w,
W_enc = W_decᵀ, b_dec = b), so wider SAEs miss fewer features and FVU falls with width as in a real sweep. Then the
real steps run: encode (darkmatter.sae.codes), measure (darkmatter.errors.measure) and the store
(darkmatter.store). Building the default experiment takes about a second.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from darkmatter.analysis import AnalysisContext, load_outputs, run
from darkmatter.analysis.verdict import most_above
from darkmatter.config import SaeFamilyConfig, SaeTrainingConfig, load_config, to_dict
from darkmatter.errors.error_saes import ErrorComponents, error_sae_specs, train_error_saes_to_folder
from darkmatter.errors.measure import LINEAR_MAP, measure_hook
from darkmatter.errors.pursuit import measure_pursuit, pursue_to_folder
from darkmatter.io import write_json
from darkmatter.paths import ExperimentPaths
from darkmatter.provenance import write_provenance
from darkmatter.sae import Sae, SaeSpec, default_cfg, save_sae
from darkmatter.sae.codes import encode_to_folder
from darkmatter.store import build_database, build_experiment_database
from darkmatter.store.schema import TABLES

REPO = Path(__file__).resolve().parent.parent
HOOK = "blocks.1.hook_resid_post"
SOURCE_HOOK, NOISE_HOOK = "blocks.1.hook_mlp_out", "blocks.0.hook_resid_post"  # make_experiment(source_hooks=True)
MIN_POS = 8


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block. Tiny tensors on a shared 2-core machine run several times
    faster on one thread than with a contended pool (a second thread only adds synchronisation)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- SAEs


def random_sae(architecture: str = "topk", d_in: int = 12, d_sae: int = 40, k: int | None = 5, seed: int = 0,
               unit_decoder: bool = False, dtype: torch.dtype = torch.float32) -> Sae:
    """An SAE with N(0, 1) weights (thresholds |N(0, 1)|/2); ``unit_decoder``: unit-norm decoder rows."""
    gen = torch.Generator().manual_seed(seed)
    name = {torch.float64: "float64", torch.float32: "float32"}[dtype]
    needs_k = architecture in ("topk", "batchtopk")
    sae = Sae(default_cfg(architecture, d_in, d_sae, k if needs_k else None, hook_name=HOOK, dtype=name,
                          metadata={"sae_id": f"{architecture}-w{d_sae}-k{k}-s0"}))
    with torch.no_grad():
        for tensor_name, t in sae.tensors().items():
            value = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            getattr(sae, tensor_name).copy_(value.abs() * 0.5 if tensor_name == "threshold" else value)
        if unit_decoder:
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
    return sae


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


def planted_atoms(n_rows: int = 100_000, d: int = 32, n_atoms: int = 48, active: int = 3, seed: int = 0,
                  dtype=np.float32) -> tuple[np.ndarray, torch.Tensor]:
    """x = Σ_{3 random atoms} c·atom + offset + small noise, c ~ U(0.5, 2.5), unit atoms; scaled ×7 (raw scale).
    Returns (x [n_rows, d], atoms [n_atoms, d]): a dictionary an SAE should recover."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=gen), dim=1)
    idx = torch.rand(n_rows, n_atoms, generator=gen).argsort(1)[:, :active]
    codes = torch.zeros(n_rows, n_atoms).scatter_(1, idx, torch.rand(n_rows, active, generator=gen) * 2 + 0.5)
    x = codes @ atoms + 3.0 + 0.01 * torch.randn(n_rows, d, generator=gen)
    return (x * 7).numpy().astype(dtype), atoms


# --------------------------------------------------------------------------------------------- activation stores


def write_activation_store(folder: Path, x: np.ndarray, contexts: np.ndarray, min_pos: int,
                           loss: np.ndarray | None = None, token_ids: np.ndarray | None = None,
                           hook: str = HOOK, others: dict[str, np.ndarray] | None = None) -> Path:
    """An activation store in darkmatter.data.activations' layout: ``x`` [N, d] float32 at ``hook`` (and the arrays
    of ``others`` at their hooks), rows grouped by ``contexts`` [N] with positions min_pos, min_pos + 1, … within
    each context."""
    folder.mkdir(parents=True)
    n = len(x)
    arrays = {hook: x, **(others or {})}
    for name, a in arrays.items():
        np.save(folder / f"{name}.npy", np.asarray(a, dtype=np.float32))
    counts = np.bincount(contexts)
    positions = np.concatenate([np.arange(min_pos, min_pos + c) for c in counts]).astype(np.int32)
    pl.DataFrame({"row": np.arange(n, dtype=np.int64), "context": contexts.astype(np.int32), "position": positions,
                  "token_id": (np.zeros(n) if token_ids is None else token_ids).astype(np.int32),
                  "loss": (np.full(n, np.nan) if loss is None else loss).astype(np.float32),
                  }).write_parquet(folder / "index.parquet")
    write_json(folder / "meta.json", {"hooks": list(arrays), "d_model": {h: int(a.shape[1]) for h, a in arrays.items()},
                                      "n_contexts": int(len(counts)), "context_size": int(min_pos + counts.max()),
                                      "min_pos": min_pos, "rows": n, "with_loss": loss is not None,
                                      "dtype": "float32"})
    return folder


# --------------------------------------------------------------------------------------------- the pipeline experiment


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

    paths: ExperimentPaths
    hook: str
    sae_ids: list[str]
    params: dict[str, Any]
    planted: Planted
    saes: dict[str, Sae] = field(repr=False)

    @property
    def db(self) -> Path:
        return self.paths.database

    def context(self, name: str = "", **options: Any) -> AnalysisContext:
        ctx = AnalysisContext(self.paths, self.params, name)
        return ctx.with_options(**options) if options else ctx

    def run(self, name: str, out: Path, **options: Any) -> dict[str, Any]:
        with torch_threads(1):
            run(importlib.import_module(f"analyses.{name}"), self.context(name, **options), out)
        return load_outputs(out)


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


class _ByteTokenizer:
    """What the store's token table needs of a tokenizer: token text 't<id>'."""

    def decode(self, ids: list[int]) -> str:
        return f"t{ids[0]}"


def make_experiment(root: Path, *, d_in: int = 48, n_contexts: int = 24, n_positions: int = 100,
                    n_features: int = 96, k_true: int = 3, signal_rank: int | None = None,
                    magnitude_jitter: float = 0.2, noise: float = 0.05, context_shift: float = 0.1,
                    widths: Sequence[int] = (16, 32, 64, 96), width_k: int = 4, ks: Sequence[int] = (2, 4, 8),
                    k_width: int = 32, extra: dict[SaeSpec, tuple[str, Sae]] | None = None,
                    fit_fraction: float = 0.6, pursuit_contexts: int | None = None, error_saes: bool = False,
                    source_hooks: bool = False, seed: int = 0) -> Experiment:
    """Build the experiment under ``root`` (module docstring); ``extra`` maps spec → (family, SAE);
    ``pursuit_contexts``: also run the pursuit steps (darkmatter.errors.pursuit) on that many contexts;
    ``error_saes``: also train the error-component SAEs (darkmatter.errors.error_saes; x is their training pool
    too) of the widest width-family SAE; ``source_hooks``: two more hooks with an exact ("linear") SAE each, whose
    activations are the widest width-family SAE's error under a random rotation (``SOURCE_HOOK``) and independent
    noise (``NOISE_HOOK``): planted predictors of that error for analyses/error_sources.py."""
    with torch_threads(1):
        rng = np.random.default_rng(seed)
        planted = planted_activations(rng, d_in=d_in, n_contexts=n_contexts, n_positions=n_positions,
                                      n_features=n_features, k_true=k_true, signal_rank=signal_rank,
                                      magnitude_jitter=magnitude_jitter, noise=noise, context_shift=context_shift)
        paths = ExperimentPaths.at(root / "results" / "planted")
        n = planted.x.shape[0]
        base = topk_sae(planted.features[:max(widths)], planted.bias, width_k)
        others = {}
        if source_hooks:
            with torch.no_grad():
                error = (torch.from_numpy(planted.x) - base(torch.from_numpy(planted.x)).x_hat).numpy()
            rotation = np.linalg.qr(rng.standard_normal((d_in, d_in)))[0]
            others = {SOURCE_HOOK: error @ rotation, NOISE_HOOK: rng.standard_normal((n, d_in))}
        store = write_activation_store(paths.activations("eval"), planted.x, planted.contexts, MIN_POS,
                                       loss=rng.uniform(1, 5, n), token_ids=rng.integers(3, 200, n), others=others)
        paths.contexts("eval").parent.mkdir(parents=True)
        pl.DataFrame({"context": np.arange(n_contexts, dtype=np.int32),
                      "doc_id": [f"doc/{c}" for c in range(n_contexts)]}).write_parquet(paths.contexts("eval"))
        families = [SaeFamilyConfig("width", "topk", HOOK, tuple(widths), (width_k,)),
                    SaeFamilyConfig("k", "topk", HOOK, (k_width,), tuple(ks))]
        saes = {}
        for fam in families:
            for w in fam.widths:
                for k in fam.ks:
                    saes.setdefault(SaeSpec("topk", w, k, 0), topk_sae(planted.features[:w], planted.bias, k))
        grown: dict[str, SaeFamilyConfig] = {}  # extra families, one per name (a training budget's: tokens set)
        for spec, (fam_name, sae) in (extra or {}).items():
            widths = (*grown[fam_name].widths, spec.d_sae) if fam_name in grown else (spec.d_sae,)
            grown[fam_name] = SaeFamilyConfig(fam_name, spec.architecture, HOOK, widths, (spec.k,), (spec.seed,),
                                              tokens=spec.tokens)
            saes[spec] = sae
        families += grown.values()
        for spec, sae in saes.items():
            save_sae(sae, paths.sae(HOOK, spec.sae_id))
            encode_to_folder(sae, planted.x, paths.codes(HOOK, spec.sae_id), {"sae_id": spec.sae_id, "hook": HOOK},
                             progress=False)
        for hook, a in others.items():  # an exact SAE per source hook, measured like any other
            spec = SaeSpec("relu", 2 * d_in, d_in, 0)
            families.append(SaeFamilyConfig(hook.split(".")[-1], "relu", hook, (spec.d_sae,), (spec.k,)))
            save_sae(linear_sae(np.eye(d_in)), paths.sae(hook, spec.sae_id))
            encode_to_folder(linear_sae(np.eye(d_in)), a, paths.codes(hook, spec.sae_id),
                             {"sae_id": spec.sae_id, "hook": hook}, progress=False)
            measure_hook([paths.sae(hook, spec.sae_id)], [paths.codes(hook, spec.sae_id)], store, hook,
                         paths.errors(hook), fit_tokens=int(round(fit_fraction * n)), seed=seed, intercept=True,
                         ridge=0.0, progress=False)
        fit_tokens = int(round(fit_fraction * n))
        ids = [spec.sae_id for spec in saes]
        measure_hook([paths.sae(HOOK, i) for i in ids], [paths.codes(HOOK, i) for i in ids], store, HOOK,
                     paths.errors(HOOK), fit_tokens=fit_tokens, seed=seed, intercept=True, ridge=0.0,
                     progress=False)
        if pursuit_contexts is not None:
            for i in ids:
                pursue_to_folder(paths.sae(HOOK, i), paths.codes(HOOK, i), store, HOOK, paths.pursuit_codes(HOOK, i),
                                 contexts=pursuit_contexts, seed=seed, progress=False)
            measure_pursuit([paths.sae(HOOK, i) for i in ids], [paths.codes(HOOK, i) for i in ids],
                            [paths.pursuit_codes(HOOK, i) for i in ids], store, HOOK, paths.pursuit_errors(HOOK),
                            fit_tokens=fit_tokens, seed=seed, intercept=True, ridge=0.0, progress=False)
        if error_saes:
            base = SaeSpec("topk", max(widths), width_k, 0)
            components = ErrorComponents.load(saes[base], paths.sae_errors(HOOK, base.sae_id) / LINEAR_MAP)
            cfg = SaeTrainingConfig(tokens=256 * 40, batch_size=256, warmup_steps=5, buffer_tokens=2048,
                                    dead_tokens=2048, log_every=10, precision="float32")
            train_error_saes_to_folder(planted.x, planted.x, planted.contexts, components,
                                       {"sae_id": base.sae_id, "hook": HOOK}, error_sae_specs(d_in, 2, width_k, 0),
                                       cfg, paths.error_saes(HOOK), progress=False)
        build_experiment_database(paths, families, HOOK, tokenizer=_ByteTokenizer())
        params = {"seed": seed, "analysis": {"bootstrap": 40, "confidence": 0.9},
                  "decomposition": {"fit_tokens": fit_tokens, "intercept": True, "ridge": 0.0, "seed": seed},
                  "families": [to_dict(f) for f in families], "harvest": {"hooks": [HOOK], "min_pos": MIN_POS}}
        return Experiment(paths, HOOK, ids, params, planted, {spec.sae_id: sae for spec, sae in saes.items()})


# --------------------------------------------------------------------------------------------- the report experiment

PROSE = ("The Congress of 1861 met in <special> session & voted 42 to 17 on the \"Union\" question ; "
         "Mr. Lincoln said the nation could not endure half slave and half free . ")
CODE = "def f(x):\n    if x < 3 and x > 0:\n        return x * 2  # </script>\n    return None\n\n"
REPORT_SAE_IDS = ("topk-w64-k4-s0", "topk-w128-k4-s0", "topk-w256-k4-s0")
REPORT_ANALYSES = ("error_predictability", "per_token_shares", "unfinished")  # the last one is never run


@dataclass(frozen=True)
class ReportExperiment:
    """A synthetic results folder for the report: a store with planted error norms, analyses, provenance.

    The error norms are planted so that the three error kinds peak on different tokens: the total error on
    numbers, the nonlinear error on capitalised words, the linear error on everything else. The texts contain
    HTML-special characters, newlines and indentation, which the pages must show literally.
    """

    paths: ExperimentPaths
    analyses: list[str]
    config: dict[str, Any]

    @property
    def db(self) -> Path:
        return self.paths.database

    @property
    def out(self) -> Path:
        return self.paths.report_index


def _words(text: str) -> list[str]:
    """Crude word-piece tokens: words keep their leading space, newlines and indents are their own tokens."""
    out: list[str] = []
    for line in text.split("\n"):
        indent = len(line) - len(line.lstrip(" "))
        if indent:
            out.append(" " * indent)
        out += [(" " if i else "") + w for i, w in enumerate(line.split())]
        out.append("\n")
    return out[:-1]


def token_frame(n_contexts: int, n_positions: int, min_pos: int) -> pl.DataFrame:
    """The tokens table: alternating prose and code contexts of ``n_positions`` tokens from ``min_pos``."""
    texts, docs = [], []
    for c in range(n_contexts):
        words = _words((PROSE if c % 2 == 0 else CODE) * (n_positions // 10 + 2))
        texts += words[c:c + n_positions]
        docs += [f"sotu/{1790 + c}-synthetic" if c % 2 == 0 else f"stdlib/mod{c}.py"] * n_positions
    n = n_contexts * n_positions
    return pl.DataFrame({
        "row": np.arange(n), "context": np.repeat(np.arange(n_contexts), n_positions),
        "position": min_pos + np.tile(np.arange(n_positions), n_contexts),
        "token_id": [sum(map(ord, t)) % 1000 for t in texts], "token_text": texts, "doc_id": docs,
        "loss": np.random.default_rng(0).random(n).astype(np.float32),
    })


def error_shard(tokens: pl.DataFrame, sae_id: str, scale: float, seed: int) -> pl.DataFrame:
    """Per-token norms with a planted structure (see :class:`ReportExperiment`); wider SAEs have smaller errors."""
    rng = np.random.default_rng(seed)
    text = tokens["token_text"].to_list()
    number = np.array([t.strip().isdigit() for t in text])
    capital = np.array([t.strip()[:1].isupper() for t in text])
    n = len(text)
    linear = scale * (1 + 0.3 * rng.random(n) + 6 * number)
    nonlinear = scale * (0.5 + 0.3 * rng.random(n) + 5 * capital)
    err = np.sqrt(linear**2 + nonlinear**2)
    return pl.DataFrame({
        "sae_id": [sae_id] * n, "row": tokens["row"], "fit": np.arange(n) % 2 == 0,
        "x_norm": np.full(n, 10.0), "x_hat_norm": np.full(n, 9.0), "error_norm": err, "error_norm_sq": err**2,
        "l0": np.full(n, 4, dtype=np.int16), "cosine": np.full(n, 0.9), "linear_error_norm": linear,
        "nonlinear_error_norm": nonlinear,
    })


def sae_frame(sae_ids: tuple[str, ...] = REPORT_SAE_IDS) -> pl.DataFrame:
    """The saes table; FVU falls with width, as it should."""
    rows = []
    for i, sid in enumerate(sae_ids):
        rows.append(dict.fromkeys(c.name for c in TABLES["saes"]) | {
            "sae_id": sid, "hook": HOOK, "families": "width", "architecture": "topk",
            "width": int(re.search(r"-w(\d+)-", sid).group(1)), "k": 4, "seed": 0, "training_tokens": 60_000,
            "fvu": 0.30 / (i + 1), "fvu_nonlinear": 0.12 - 0.01 * i, "fvu_linear": 0.30 / (i + 1) - (0.12 - 0.01 * i),
            "r2_norm_sq": 0.93 + 0.01 * i, "l0_mean": 4.0, "dead_fraction": 0.01 * i,
        })
    return pl.DataFrame(rows) if rows else sae_frame().clear()  # no SAEs: the columns, no rows


def fake_analysis_module(name: str, doc: str, claim: str, compute, summarize, plot,
                         headline: tuple[str, ...] = (), verdict=None) -> types.ModuleType:
    """A module that fulfils the analysis contract with the given functions (``verdict``: optional)."""
    module = types.ModuleType(f"analyses.{name}", doc)
    module.PAPER_CLAIM, module.HEADLINE = claim, headline
    module.compute, module.summarize, module.plot = compute, summarize, plot
    if verdict is not None:
        module.verdict = verdict
    return module


def _bar_figure(labels: list[str], values: list[float], title: str):
    from darkmatter.analysis.figures import new_figure

    fig, ax = new_figure(figsize=(3.2, 2.0))
    ax.bar(labels, values, color="#4c78a8")
    ax.set_title(title)
    return fig


def _write_report_analyses(paths: ExperimentPaths) -> None:
    """Two analyses through the real runner (``darkmatter.analysis.run``), reading the synthetic store."""
    def predictability(ctx: AnalysisContext) -> pl.DataFrame:
        with ctx.connect() as con:
            return con.sql("SELECT sae_id, width, r2_norm_sq, fvu FROM saes ORDER BY width").pl()

    def shares(ctx: AnalysisContext) -> pl.DataFrame:
        with ctx.connect() as con:
            return con.sql("""SELECT sae_id, context, avg(linear_error_norm) AS linear_norm_mean,
                                     avg(nonlinear_error_norm) AS nonlinear_norm_mean
                              FROM token_errors_in_context GROUP BY sae_id, context
                              ORDER BY sae_id, context""").pl()

    modules = [
        fake_analysis_module(
            "error_predictability",
            "How much of the SAE error is linearly predictable from x?\n\nRegress the squared error norm on x "
            "with an affine map fitted on half the tokens. Score R² on the other half.",
            "Squared-norm R² > 0.9 for most SAEs; vector R² ≈ 0.5.",
            predictability,
            lambda t: {"r2_norm_sq_median": float(t["r2_norm_sq"].median()), "saes": t.height,
                       "fvu_min": float(t["fvu"].min())},
            lambda t: {"r2_norm_sq": _bar_figure([str(w) for w in t["width"]], t["r2_norm_sq"].to_list(), "R²"),
                       "fvu": _bar_figure([str(w) for w in t["width"]], t["fvu"].to_list(), "FVU")},
            headline=("saes", "r2_norm_sq_median"),
            verdict=lambda s, t: most_above([0.5] * t.height, t["r2_norm_sq"].to_list(), 0.9, "R²(‖SaeError‖²)"),
        ),
        fake_analysis_module(
            "per_token_shares",
            "Which contexts carry the nonlinear error?\n\nAverage the linear and nonlinear error norms per "
            "context and SAE.",
            "Larger SAEs struggle with the same tokens as smaller ones.",
            shares,
            lambda t: {"nonlinear_norm_mean_max": float(t["nonlinear_norm_mean"].max()), "rows": t.height,
                       "note": "synthetic <data> & co"},
            lambda t: {"shares": _bar_figure(["lin", "nonlin"], [float(t["linear_norm_mean"].mean()),
                                                                 float(t["nonlinear_norm_mean"].mean())], "mean")},
        ),
    ]
    for module in modules:
        name = module.__name__.rsplit(".", 1)[-1]
        run(module, AnalysisContext(paths, {"seed": 0}, name), paths.analysis(name))


def make_report_experiment(root: Path, n_contexts: int = 12, n_positions: int = 60, name: str = "synthetic",
                           sae_ids: tuple[str, ...] = REPORT_SAE_IDS, analyses: bool = True) -> ReportExperiment:
    """Build the synthetic report experiment under ``root`` (results/<name>/…, reports/<name>/ left empty)."""
    config = to_dict(load_config(REPO / "config" / "smoke.yaml")) | {"name": name}
    paths = ExperimentPaths.of(name, root)
    paths.root.mkdir(parents=True)
    tokens = token_frame(n_contexts, n_positions, config["harvest"]["min_pos"])
    shards = []
    for i, sid in enumerate(sae_ids):
        path = paths.root / "shards" / f"{sid}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        error_shard(tokens, sid, scale=1.0 / (i + 1), seed=i).write_parquet(path)
        shards.append(path)
    build_database(paths.database, tokens, sae_frame(sae_ids), shards)
    for stage in ("activations/eval", "activations/train", "corpus"):
        write_provenance(paths.root / stage, {"stage": stage}, started=time.time() - 12.5)
    if analyses:
        _write_report_analyses(paths)
    return ReportExperiment(paths, list(REPORT_ANALYSES), config)
