"""What each workflow step asks a scheduler for: memory (``mem_mb``), wall time (``runtime``, minutes), GPUs.

Snakemake passes these to a cluster executor (``snakemake --profile profiles/slurm``: ``sbatch --mem``, ``-t``,
``--gpus``); a local run ignores them unless ``--resources`` caps them. They are estimates from the experiment's
sizes, read offline at plan time: the model's shape, token counts, SAE widths and k.

* Memory: a fixed interpreter share (:data:`BASE_MB`: Python, torch, transformers) plus the step's largest
  arrays (model weights, logits of one batch, the SAE's weights with Adam state, the eval pool where a step reads
  all of it) times :data:`MEMORY_MARGIN`. Written activation pools are not counted: they go through the page
  cache to disk (``disk_mb``), which the kernel flushes under memory pressure instead of killing the job.
* Runtime: work units (token × parameter for the language model, token × d_model × d_sae for SAEs, ...) times
  the seconds per unit measured on the default run on 2 AVX2 cores (the slowest machine it was run on), times
  :data:`RUNTIME_MARGIN`, at least :data:`MIN_RUNTIME` minutes. More cores or a GPU only finish earlier.

Anything can be overridden per rule with ``snakemake --set-resources train_sae:mem_mb=32000``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from darkmatter.config.sections import ExperimentConfig, ModelConfig
from darkmatter.config.validate import EMBEDDED_N_LAYERS
from darkmatter.sae.families import SaeSpec, error_sae_base, expand_families, parse_sae_id, widest

MB = 1 << 20
FLOAT = 4  # bytes of a float32
BASE_MB = 1024  # one step's interpreter: ~250 MB RSS after importing torch + transformers, plus thread pools
MEMORY_MARGIN = 1.5
RUNTIME_MARGIN = 2.0
MIN_RUNTIME = 10  # minutes: start-up, imports and loading inputs, whatever the size

# Seconds per work unit, measured on the default run (2 AVX2 cores shared with other jobs, float32).
MODEL_S = 3.1e-11  # per token × model parameter (n_params below): harvest eval, 307,200 tokens in 1,396 s
SAE_S = 4.3e-11  # per token × d_model × d_sae: error SAEs 36 min (3 × 9216 + the 16384 encoder, 2M tokens)
PURSUIT_S = 1e-11  # per token × iteration × d_model × d_sae: pursuit with topk-w4096-k128, 49,440 tokens in 138 s
REGRESSION_S = 1.2e-10  # per token × d_model² × SAE: b* fits (measure_errors 78 s, measure_pursuit 36 s)
ANALYSIS_S = 4e-5  # per eval token × SAE: the slowest analysis (error_sources, 90 s)
STORE_S = 1e-5  # per stored row (token × SAE): build_database 12 s for 3.1M rows

# The embedded SmolLM2-135M-Instruct (tests/test_resources.py checks these against the GGUF's header).
EMBEDDED = dict(d_model=576, n_layers=EMBEDDED_N_LAYERS, n_heads=9, d_ff=1536, vocab_size=49152)
RANDOM_VOCAB = 259  # darkmatter.data.models.byte_tokenizer: 256 bytes + 3 special tokens
# A hub model whose config.json is not in the local Hugging Face cache: sized as a 7B-class model (an upper bound
# for the models this project targets); --set-resources corrects it.
UNKNOWN = dict(d_model=4096, n_layers=32, n_heads=32, d_ff=14336, vocab_size=128256)

# The steps that run torch on the language model or an SAE: where a GPU would help.
TORCH_STEPS = frozenset({"harvest", "train-sae", "encode-sae", "measure-ce", "pursue", "measure-pursuit-ce",
                         "measure-sources-ce", "train-error-saes"})


@dataclass(frozen=True)
class ModelShape:
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    vocab_size: int

    @property
    def n_params(self) -> int:
        """Tied embedding + blocks of full multi-head attention and a gated MLP: an upper bound for GQA models."""
        return self.vocab_size * self.d_model + self.n_layers * (4 * self.d_model ** 2 + 3 * self.d_model * self.d_ff)


def _from_hf_config(path: Path) -> ModelShape | None:
    """The shape in a Hugging Face ``config.json`` (Llama-style or GPT-2-style keys), None if unreadable."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    d = cfg.get("hidden_size", cfg.get("n_embd"))
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    vocab = cfg.get("vocab_size")
    if not all(isinstance(v, int) for v in (d, layers, heads, vocab)):
        return None
    d_ff = cfg.get("intermediate_size", cfg.get("n_inner")) or 4 * d
    return ModelShape(d, layers, heads, d_ff, vocab)


def model_shape(model: ModelConfig) -> ModelShape:
    """The configured model's shape, known offline: built in, from the config, or from a local config.json."""
    if model.source == "embedded":
        return ModelShape(**EMBEDDED)
    if model.source == "random":
        r = model.random
        return ModelShape(r.d_model, r.n_layers, r.n_heads, r.d_ff, RANDOM_VOCAB)
    if model.source == "local":
        # a missing folder is prepare_model's error to report (one sentence), not the planner's
        return _from_hf_config(Path(model.path or "") / "config.json") or ModelShape(**UNKNOWN)
    try:  # hub: its config.json when an earlier run left it in the local cache (never the network)
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model.name, "config.json", revision=model.revision)
    except Exception:  # any cache problem only costs the estimate its accuracy
        cached = None
    shape = _from_hf_config(Path(cached)) if isinstance(cached, str) else None
    return shape or ModelShape(**UNKNOWN)


@dataclass(frozen=True)
class Sizes:
    """The experiment's sizes that the estimates read."""

    shape: ModelShape
    eval_rows: int  # eval tokens with position >= min_pos (rows of the eval pool)
    train_rows: int  # train tokens (rows of the train pool)
    pursued: int  # eval tokens the pursuit runs on

    @classmethod
    def of(cls, cfg: ExperimentConfig, shape: ModelShape) -> Sizes:
        h = cfg.harvest
        keep = h.context_size - h.min_pos
        contexts = cfg.pursuit.contexts
        pursued = keep * (h.eval_contexts if contexts is None else min(contexts, h.eval_contexts))
        return cls(shape, h.eval_contexts * keep, h.train_tokens, pursued)


def gpus(cfg: ExperimentConfig, step: str) -> int:
    """GPUs a step asks for: one for the :data:`TORCH_STEPS` when ``device`` names CUDA (``auto`` uses a GPU only
    where one is visible, so it asks for none); the SLURM executor turns ``gpu`` into ``--gpus``."""
    return int(cfg.device.startswith("cuda") and step in TORCH_STEPS)


def _mem_mb(work_bytes: float) -> int:
    """:data:`BASE_MB` plus the working set with its margin, rounded up to 256 MB."""
    mb = BASE_MB + MEMORY_MARGIN * work_bytes / MB
    return int(math.ceil(mb / 256) * 256)


def _runtime(seconds: float) -> int:
    return max(MIN_RUNTIME, int(math.ceil(RUNTIME_MARGIN * seconds / 60)))


def _sae_training_bytes(cfg: ExperimentConfig, d: int, d_sae: int, n_saes: int = 1) -> float:
    """``n_saes`` SAEs trained on one stream: each one's weights + gradients + Adam moments (4 copies), one batch's
    dense pre-activations, latents and their gradients, and the float64 sample that b_dec starts from; the
    shuffle buffer (and its shuffled copy) once."""
    t = cfg.training
    params = 2 * d_sae * d + d_sae + d
    each = 4 * params * FLOAT + 3 * t.batch_size * d_sae * FLOAT + 2 * 32_768 * d * 8
    return n_saes * each + 2 * t.buffer_tokens * d * FLOAT


def _forward_bytes(shape: ModelShape, tokens: int, with_logits: bool) -> float:
    """The model's weights plus one batch's transients: hidden states, MLP and attention scores of one layer at a
    time, and, when the loss is computed, the logits with their log-softmax and loss buffers."""
    ctx_heads = shape.n_heads * min(tokens, 4096)  # attention scores [batch, heads, ctx, ctx] per layer
    per_token = 8 * shape.d_model + 2 * shape.d_ff + 2 * ctx_heads + (3 * shape.vocab_size if with_logits else 0)
    return shape.n_params * FLOAT + tokens * per_token * FLOAT


def step_resources(cfg: ExperimentConfig, step: str, shape: ModelShape, *, split: str | None = None,
                   sae_id: str | None = None, hook: str | None = None) -> dict[str, int]:
    """``mem_mb``, ``runtime`` (minutes) and ``gpu`` of one job of ``step`` (a name of
    :data:`darkmatter.config.STEP_KEYS` without the split: ``harvest`` takes ``split``), plus ``disk_mb`` for the
    harvest; ``sae_id`` and ``hook``: the job's wildcards, for the steps that have them."""
    s = Sizes.of(cfg, shape)
    h, d = cfg.harvest, shape.d_model
    members = expand_families(cfg.families, cfg.primary_hook)
    of_hook = [m for m in members if m.hook == (hook or cfg.primary_hook)]
    spec: SaeSpec | None = parse_sae_id(sae_id) if sae_id else None
    batch_tokens = h.batch_contexts * h.context_size
    out: dict[str, int] = {}
    if step == "prepare-model":  # the GGUF dequantised, the float32 model and its saved copy
        mem, sec = (0 if cfg.model.source == "hub" else 3 * shape.n_params * FLOAT), 0.0
    elif step == "prepare-corpus":  # every context's token ids as int64, a few copies while they are cut
        contexts = h.eval_contexts + math.ceil(h.train_tokens / (h.context_size - h.train_min_pos))
        mem, sec = 4 * contexts * h.context_size * 8, 0.0
    elif step == "harvest":
        train = split == "train"
        rows = s.train_rows if train else s.eval_rows
        tokens = math.ceil(rows / (h.context_size - (h.train_min_pos if train else h.min_pos))) * h.context_size
        mem = _forward_bytes(shape, batch_tokens, with_logits=not train) + (0 if train else tokens * FLOAT)
        sec = tokens * shape.n_params * MODEL_S
        out["disk_mb"] = int(math.ceil(rows * d * FLOAT * len(h.hooks) / MB)) + 1024  # the pool, + index and slack
    elif step == "train-sae":
        mem = _sae_training_bytes(cfg, d, spec.d_sae)
        sec = (spec.tokens or cfg.training.tokens) * d * spec.d_sae * SAE_S
    elif step == "import-sae":  # the source's weights, their float32 copy and the copy being written
        mem, sec = 3 * 2 * spec.d_sae * d * FLOAT, 0.0
    elif step == "encode-sae":  # weights, chunks of 2**24 dense pre-activations (darkmatter.sae.codes), codes
        mem = 2 * spec.d_sae * d * FLOAT + 2 * (1 << 24) * FLOAT + 2 * s.eval_rows * spec.k * 8
        sec = s.eval_rows * d * spec.d_sae * SAE_S
    elif step in ("measure-errors", "measure-pursuit"):  # x, reconstruction, error; b* fits in float64
        rows = s.eval_rows if step == "measure-errors" else s.pursued
        fits = len(of_hook) * (1 if step == "measure-errors" else 2)
        fit = min(cfg.decomposition.fit_tokens, rows)
        mem = 4 * rows * d * FLOAT + 2 * fit * d * 8 + rows * fits * 64
        sec = rows * d * d * fits * REGRESSION_S
    elif step in ("measure-ce", "measure-pursuit-ce", "measure-sources-ce"):
        # measure-sources-ce: the base SAE and the previous layer's, sized here as two of the widest
        saes = of_hook if step == "measure-ce" else [widest(of_hook)] * (2 if step == "measure-sources-ce" else 1)
        tokens = cfg.downstream.contexts * h.context_size
        # clean, plus each SAE's three, the pursuit, or the two of measure-sources-ce
        conditions = 1 + {"measure-ce": 3 * len(saes), "measure-pursuit-ce": 1, "measure-sources-ce": 2}[step]
        mem = (_forward_bytes(shape, cfg.downstream.batch_contexts * h.context_size, with_logits=True)
               + sum(2 * m.spec.d_sae * d * FLOAT for m in saes) + tokens * conditions * 8)
        sec = tokens * conditions * shape.n_params * MODEL_S
        if step == "measure-pursuit-ce":
            w = saes[0].spec
            sec += tokens * _iterations(cfg, w.k) * d * w.d_sae * PURSUIT_S
        if step == "measure-sources-ce":  # the map, fitted from both SAEs' codes of the eval rows
            mem += 2 * s.eval_rows * d * FLOAT
            sec += s.eval_rows * d * d * 2 * REGRESSION_S
    elif step == "pursue":
        iters = _iterations(cfg, spec.k)
        mem = 3 * s.pursued * d * FLOAT + 2 * spec.d_sae * d * FLOAT + s.pursued * iters * 8 + 4 * (1 << 24) * FLOAT
        sec = s.pursued * iters * d * spec.d_sae * PURSUIT_S
    elif step == "train-error-saes":  # three SAEs trained jointly, the base SAE's encoder, the eval pool
        es = cfg.error_saes
        base = error_sae_base(of_hook, es.base, es.k).spec
        width = es.expansion * d
        mem = (_sae_training_bytes(cfg, d, width, n_saes=3) + 2 * base.d_sae * d * FLOAT
               + cfg.training.batch_size * base.d_sae * FLOAT + 3 * s.eval_rows * d * FLOAT)
        sec = cfg.training.tokens * d * (3 * width + base.d_sae) * SAE_S
    elif step == "build-database":  # DuckDB spills beyond its memory limit: the per-token tables' rows
        rows = s.eval_rows * len(members) + 2 * s.pursued * len(members)
        mem, sec = rows * 64, rows * STORE_S
    elif step == "run-analysis":  # the eval pool and every SAE's per-token errors
        mem = 2 * s.eval_rows * d * FLOAT + s.eval_rows * len(members) * 64
        sec = s.eval_rows * len(members) * ANALYSIS_S
    elif step == "render-report":
        mem, sec = s.eval_rows * len(members) * 16, 0.0
    else:
        raise ValueError(f"no resource estimate for step {step!r}.")
    out |= {"mem_mb": _mem_mb(mem), "runtime": _runtime(sec), "gpu": gpus(cfg, step)}
    return out


def _iterations(cfg: ExperimentConfig, k: int) -> int:
    """Pursuit iterations per token: ``l0`` if set, else the encoder's L0 (at most k) times ``l0_multiple``."""
    p = cfg.pursuit
    return p.l0 if p.l0 is not None else k * p.l0_multiple
