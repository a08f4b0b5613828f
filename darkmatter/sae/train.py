"""Train one SAE on harvested activations: initialisation, optimiser, schedule, checkpoints, train log.

The recipe (every choice is a key of :class:`darkmatter.config.SaeTrainingConfig`; the libraries each choice follows are named with it):

- ``input_scaling="mean_squared_norm"``: train on x / s with s = √(E‖x‖²/d_in), so E‖x/s‖² = d_in (per-dimension
  RMS 1, as SAELens' ``expected_average_only_in``); s is folded into the saved weights (darkmatter.sae.fold).
- ``b_dec_init``: geometric median (OpenAI, dictionary_learning; Weiszfeld iterations in float64) of a seeded
  sample of ``INIT_SAMPLE_ROWS`` rows, or their mean (sparsify), or zeros (SAELens v6).
- Decoder rows: Gaussian directions of unit norm; ``encoder_init_transpose``: W_enc = W_decᵀ (OpenAI, sparsify,
  dictionary_learning), else nn.Linear's uniform init. b_enc = 0.
- ``normalize_decoder``: before every Adam step the gradient component parallel to each decoder row is
  removed and after it the rows are renormalised to unit norm (OpenAI, sparsify, dictionary_learning).
- Adam(``adam_betas``, ``adam_eps``) with lr = ``lr_base``·(d_sae/2¹⁴)^(−``lr_width_exponent``) unless ``lr``
  is set; linear warm-up over ``warmup_steps``, then linear decay to 0 from the fraction ``decay_start`` of
  training (dictionary_learning's ``decay_start``). The shape is sparsify's and dictionary_learning's law
  (2e-4/√(d_sae/2¹⁴)), but their constants are for runs of 10⁸–10⁹ tokens; at the default 2M tokens (~490
  steps) they leave SAEs far from converged. Measured on the default experiment (TopK, k = 32, 2M tokens, eval
  FVU / dead fraction): w16384 at 2e-4 0.271 / 0%, 8e-4 0.169 / 0%, 1.6e-3 0.145 / 1.5%, 3.2e-3 0.136 / 20%;
  w4096 at 3.2e-3 0.156 / 0.9%, 6.4e-3 0.157 / 14%; w1024 at 8e-4 0.230 / 0%, 3.2e-3 0.206 / 0.2%, 6.4e-3
  0.216 / 13%. The best rate without many dead latents falls about as (d_sae)^(−1/4), hence the defaults
  ``lr_base = 1.6e-3``, ``lr_width_exponent = 0.25``; (2e-4, 0.5) restores the ecosystem's law.
- Dead latents (AuxK): not active for ``dead_tokens`` tokens; k_aux = ``k_aux`` or d_in/2 (OpenAI App. B.1).
- BatchTopK threshold: EMA (β = ``batchtopk_threshold_beta``, started at the first step's value) of the batch's
  smallest positive selected activation (dictionary_learning; SAELens uses the same statistic).
- JumpReLU: θ init = ``jumprelu_init_threshold``·ρ, bandwidth ε = ``jumprelu_bandwidth``·ρ with ρ the per-
  dimension RMS of the training input (SAELens' defaults 0.01 / 0.05 assume ρ = 1); θ clamped at ≥ 0.
- ReLU: the L1 coefficient is ``l1_coef``·exp(u) with u += ``l1_adapt_rate``·log((L0 + 1)/(k + 1)) after every
  step (dual ascent towards the family's target L0 = k; ``l1_adapt_rate = 0`` keeps it fixed).

Reproducibility: the initial weights come from a ``torch.Generator`` seeded with the member's seed, the data
order is a pure function of it (darkmatter.sae.batches), and a checkpoint holds everything else (weights and Adam
state in safetensors, step and scalars in JSON), so same seed → bitwise-identical weights on one machine and
thread count, and a resumed run ends with the same weights as an uninterrupted one.

Device (darkmatter.device): the initialisation runs on the CPU (the same initial weights everywhere), then the SAE,
Adam's state and each batch live on ``device`` and the steps run there, with the same kernels
(darkmatter.sae.kernels does its index bookkeeping with torch ops on a GPU); the trained SAE is folded on the CPU to
be written. A checkpoint resumes on any device (the same weights then need the same device throughout).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from darkmatter.config import SaeTrainingConfig, stable_hash, to_dict
from darkmatter.io import atomic_dir, check_finite, load_safetensors, read_json, write_json
from darkmatter.precision import resolve_precision
from darkmatter.sae.batches import ShuffledBatches, derived_seed
from darkmatter.sae.families import SaeSpec
from darkmatter.sae.model import Sae, default_cfg, fold
from darkmatter.sae.objectives import LossSpec, StepOutput

log = logging.getLogger(__name__)

INIT_SAMPLE_ROWS = 32_768  # OpenAI computes its geometric-median b_pre on the first 32,768 activations
LOG_COLUMNS = ("step", "tokens", "loss", "fvu", "l0", "aux", "dead_fraction", "lr", "sparsity_coef")


SMALL_STEP_FLOPS = 1e9  # below this encoder GEMM size per step, a second thread costs more than it saves


def threads_for(d_in: int, d_sae: int, batch_size: int, available: int) -> int:
    """Threads worth using for a training step: 1 for tiny SAEs, whose many small ops are dominated by
    thread synchronisation (measured ~5x slower with 2 threads on a shared 2-core machine), else all."""
    return 1 if 2 * batch_size * d_in * d_sae < SMALL_STEP_FLOPS else available


def default_lr(d_sae: int, cfg: SaeTrainingConfig | None = None) -> float:
    """``lr_base``·(d_sae/2¹⁴)^(−``lr_width_exponent``) (see the module docstring for the measured choice)."""
    cfg = cfg or SaeTrainingConfig()
    return cfg.lr_base * (d_sae / 2**14) ** -cfg.lr_width_exponent


def lr_at(step: int, n_steps: int, cfg: SaeTrainingConfig, base: float) -> float:
    """Learning rate of (0-based) ``step``: linear warm-up, constant, linear decay to 0 after ``decay_start``."""
    factor = 1.0
    if step < cfg.warmup_steps:
        factor = (step + 1) / cfg.warmup_steps
    decay_from = int(cfg.decay_start * n_steps)
    if step >= decay_from and n_steps > decay_from:
        factor = min(factor, (n_steps - step) / (n_steps - decay_from))
    return base * factor


def geometric_median(x: Tensor, iters: int = 200, tol: float = 1e-9) -> Tensor:
    """argmin_y Σ‖x_i − y‖ by Weiszfeld's iteration in float64 (deterministic; x [N, d] → [d])."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-12):
            return y_new
        y = y_new
    return y


def sample_rows(data: np.ndarray, n: int, gen: torch.Generator) -> Tensor:
    """A seeded random sample of min(n, rows) rows (read in ascending order from a memmap)."""
    idx = torch.randperm(data.shape[0], generator=gen)[: min(n, data.shape[0])].sort().values.numpy()
    rows = np.asarray(data[idx], dtype=np.float32)
    # a NaN here would make the initial b_dec and input scale NaN before any batch is checked
    check_finite(rows, 0, getattr(data, "filename", None) or "the training activations", ids=idx)
    return torch.from_numpy(rows)


@dataclass(frozen=True)
class TrainResult:
    sae: Sae  # folded: works on raw activations, unit-norm decoder rows
    log: pl.DataFrame  # LOG_COLUMNS, one row every log_every steps and at the last step
    input_scale: float
    steps: int


class Trainer:
    """Trains one SAE; ``run()`` resumes from ``checkpoint_dir`` when it holds a checkpoint of the same run."""

    def __init__(self, data: np.ndarray, spec: SaeSpec, cfg: SaeTrainingConfig,
                 sae_cfg: dict[str, Any] | None = None, checkpoint_dir: str | Path | None = None,
                 device: torch.device | str = "cpu"):
        self.data, self.spec, self.cfg = data, spec, cfg
        self.device = torch.device(device)
        self.d_in = int(data.shape[1])
        self.n_steps = cfg.tokens // cfg.batch_size
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.precision = resolve_precision(cfg.precision, self.device)
        # the resolved precision is part of the run: a checkpoint from a machine that chose otherwise is not resumed
        self.key = stable_hash({"spec": asdict(spec), "training": to_dict(cfg), "data_shape": list(data.shape),
                                "precision": self.precision.dtype})
        gen = torch.Generator().manual_seed(derived_seed(spec.seed, 0))
        sample = sample_rows(data, INIT_SAMPLE_ROWS, gen)
        self.input_scale = 1.0
        if cfg.input_scaling == "mean_squared_norm":
            self.input_scale = float(sample.double().pow(2).sum(1).mean().div(self.d_in).sqrt())
        sample = sample / self.input_scale
        self.rms = float(sample.double().pow(2).mean().sqrt())  # per-dimension RMS of the training input
        extra = dict(sae_cfg or {})
        extra.pop("architecture", None)
        self.sae = Sae(default_cfg(spec.architecture, self.d_in, spec.d_sae, spec.k) | extra)
        self._init_weights(sample, gen)
        self.sae.to(self.device)
        self.base_lr = cfg.lr if cfg.lr is not None else default_lr(spec.d_sae, cfg)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.base_lr, betas=tuple(cfg.adam_betas),
                                    eps=cfg.adam_eps, fused=True)
        self.step = 0
        self.rows: list[dict[str, float]] = []
        self.l1_log_scale = 0.0
        self.tokens_since_fired = torch.zeros(spec.d_sae, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def _init_weights(self, sample: Tensor, gen: torch.Generator) -> None:
        sae, cfg = self.sae, self.cfg
        W_dec = torch.randn(sae.d_sae, self.d_in, generator=gen)
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
        if cfg.encoder_init_transpose:
            sae.W_enc.copy_(sae.W_dec.t())
        else:
            bound = 1 / math.sqrt(self.d_in)
            sae.W_enc.copy_(torch.rand(self.d_in, sae.d_sae, generator=gen) * 2 * bound - bound)
        if cfg.b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(sample))
        elif cfg.b_dec_init == "mean":
            sae.b_dec.copy_(sample.double().mean(0))
        sae.arch.init(self)

    # ------------------------------------------------------------------------------------------ one step

    def _loss_spec(self) -> LossSpec:
        cfg, spec = self.cfg, self.spec
        dead = None
        if self.sae.arch.selects_top_k and cfg.auxk_coef > 0:
            dead = (self.tokens_since_fired >= cfg.dead_tokens).nonzero().flatten()
        return LossSpec(k=spec.k, dead=dead, k_aux=cfg.k_aux or self.d_in // 2, auxk_coef=cfg.auxk_coef,
                        sparsity_coef=self.sae.arch.sparsity_coef(self), jumprelu_mode=cfg.jumprelu_sparsity,
                        bandwidth=cfg.jumprelu_bandwidth * self.rms, bf16=self.precision.autocast_bf16)

    def train_step(self, x: Tensor) -> StepOutput:
        sae, cfg = self.sae, self.cfg
        x = x.to(self.device)
        lr = lr_at(self.step, self.n_steps, cfg, self.base_lr)
        for group in self.opt.param_groups:
            group["lr"] = lr
        spec = self._loss_spec()
        out = sae.arch.train_step(sae, x / self.input_scale, spec)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        with torch.no_grad():
            if cfg.normalize_decoder and sae.W_dec.grad is not None:
                g = sae.W_dec.grad  # rows of W_dec are unit norm here: remove g's component along them
                g.addcmul_(sae.W_dec, torch.linalg.vecdot(g, sae.W_dec)[:, None], value=-1)
            self.opt.step()
            if cfg.normalize_decoder:
                sae.W_dec.div_(torch.linalg.vector_norm(sae.W_dec, dim=1, keepdim=True))
            sae.arch.after_step(self, out)  # thresholds, the L1 controller (darkmatter.sae.architectures)
        self.tokens_since_fired += x.shape[0]
        self.tokens_since_fired[out.fired] = 0
        self.step += 1
        if self.step % cfg.log_every == 0 or self.step == self.n_steps:
            self.rows.append({
                "step": self.step, "tokens": self.step * cfg.batch_size, "loss": float(out.loss.detach()),
                "fvu": float(out.fvu), "l0": float(out.l0), "aux": float(out.aux), "lr": lr,
                "dead_fraction": float((self.tokens_since_fired >= cfg.dead_tokens).double().mean()),
                "sparsity_coef": spec.sparsity_coef,
            })
        return out

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        assert self.checkpoint_dir is not None
        tensors = {f"sae.{k}": v.detach().cpu().clone() for k, v in self.sae.state_dict().items()}
        for name, p in self.sae.named_parameters():
            for key, value in self.opt.state.get(p, {}).items():
                tensors[f"adam.{name}.{key}"] = value.detach().cpu().clone()
        tensors["tokens_since_fired"] = self.tokens_since_fired.cpu().clone()
        with atomic_dir(self.checkpoint_dir) as tmp:
            save_file(tensors, str(tmp / "state.safetensors"))
            write_json(tmp / "state.json", {"key": self.key, "step": self.step, "rows": self.rows,
                                            "l1_log_scale": self.l1_log_scale})

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint of this exact run (same spec, config and data shape); False if none."""
        d = self.checkpoint_dir
        if d is None or not (d / "state.json").is_file():
            return False
        meta = read_json(d / "state.json")
        if meta.get("key") != self.key:
            log.warning("ignoring checkpoint %s: it belongs to another configuration", d)
            return False
        tensors = load_safetensors(d / "state.safetensors", device=str(self.device))
        with torch.no_grad():
            self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
            for name, p in self.sae.named_parameters():
                keys = [k for k in ("step", "exp_avg", "exp_avg_sq") if f"adam.{name}.{k}" in tensors]
                self.opt.state[p] = {k: tensors[f"adam.{name}.{k}"].clone() for k in keys}
        self.tokens_since_fired = tensors["tokens_since_fired"].clone()
        self.step, self.rows, self.l1_log_scale = meta["step"], meta["rows"], meta["l1_log_scale"]
        log.info("resumed %s at step %d/%d", self.spec.sae_id, self.step, self.n_steps)
        return True

    # ------------------------------------------------------------------------------------------ loop

    def batches(self, data: np.ndarray | None = None) -> ShuffledBatches:
        """This run's data order over its rows (or over ``data``, which has as many): a pure function of the
        member's seed (darkmatter.sae.batches)."""
        return ShuffledBatches(self.data if data is None else data, self.cfg.batch_size, self.cfg.buffer_tokens,
                               derived_seed(self.spec.seed, 1))

    def advance(self, x: Tensor) -> StepOutput:
        """One training step on batch ``x``, checkpointing every ``checkpoint_every`` steps (not at the last)."""
        out = self.train_step(x)
        if self.checkpoint_dir is not None and self.step % self.cfg.checkpoint_every == 0 and self.step < self.n_steps:
            self.save_checkpoint()
        return out

    def run(self, progress: bool = True, stop_at: int | None = None) -> TrainResult | None:
        """Train to the end (or stop after ``stop_at`` steps, returning None: a simulated interruption)."""
        cfg = self.cfg
        self.load_checkpoint()
        bar = tqdm(total=self.n_steps * cfg.batch_size, initial=self.step * cfg.batch_size, unit="tok",
                   unit_scale=True, desc=self.spec.sae_id, disable=not progress)
        started = time.time()
        for x in self.batches().batches(self.step):
            if self.step >= self.n_steps or (stop_at is not None and self.step >= stop_at):
                break
            out = self.advance(x)
            bar.update(cfg.batch_size)
            if self.step % cfg.log_every == 0:
                bar.set_postfix(fvu=f"{float(out.fvu):.4f}", l0=f"{float(out.l0):.1f}")
        bar.close()
        if self.step < self.n_steps:
            return None
        return self.result(time.time() - started)

    def result(self, elapsed: float) -> TrainResult:
        """The trained SAE, folded to work on raw inputs, with its metadata and the train log."""
        cfg = self.cfg
        log.info("trained %s: %d steps, final batch fvu %.4f, l0 %.1f (%.0f tok/s this session)", self.spec.sae_id,
                 self.n_steps, self.rows[-1]["fvu"], self.rows[-1]["l0"],
                 self.n_steps * cfg.batch_size / max(elapsed, 1e-9))
        folded = fold(self.sae, self.input_scale)
        folded.cfg["metadata"] = dict(folded.cfg.get("metadata") or {}) | {
            "sae_id": self.spec.sae_id, "seed": self.spec.seed, "target_l0": self.spec.k,
            "training_tokens": self.n_steps * cfg.batch_size, "input_scale": self.input_scale,
            "training_config_hash": stable_hash(to_dict(cfg)), "training_precision": self.precision.dtype,
        }
        return TrainResult(folded, pl.DataFrame(self.rows).select(LOG_COLUMNS), self.input_scale, self.n_steps)


def train_to_folder(data: np.ndarray, spec: SaeSpec, cfg: SaeTrainingConfig, out: str | Path,
                    sae_cfg: dict[str, Any] | None = None, params: Any = None, progress: bool = True,
                    device: torch.device | str = "cpu", device_info: dict[str, Any] | None = None) -> TrainResult:
    """Train on ``device`` (resuming from ``.<name>.ckpt`` beside ``out``) and write the SAE folder atomically:
    cfg.json, sae_weights.safetensors, train_log.parquet, provenance.json (with ``device_info``,
    darkmatter.device)."""
    started = time.time()
    out = Path(out)
    trainer = Trainer(data, spec, cfg, sae_cfg, checkpoint_dir=checkpoint_of(out), device=device)
    result = trainer.run(progress=progress)
    assert result is not None
    write_trained(trainer, result, out, params, started, extra={"device": device_info})
    shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)  # type: ignore[arg-type]
    return result


def checkpoint_of(out: Path) -> Path:
    """Where the training of the SAE folder ``out`` checkpoints: the hidden sibling ``.<name>.ckpt``."""
    return out.with_name(f".{out.name}.ckpt")


def write_trained(trainer: Trainer, result: TrainResult, out: Path, params: Any, started: float,
                  extra: dict[str, Any] | None = None) -> None:
    """The SAE folder ``out``, atomically: cfg.json, sae_weights.safetensors, train_log.parquet, provenance.json
    (the recipe's precision and ``extra``)."""
    from darkmatter.provenance import write_provenance
    from darkmatter.sae.model import write_sae_files

    with atomic_dir(out) as tmp:
        write_sae_files(result.sae, tmp)
        result.log.write_parquet(tmp / "train_log.parquet")
        write_provenance(tmp, params, seeds={"sae": trainer.spec.seed}, started=started,
                         extra={"precision": trainer.precision.record()} | (extra or {}))
