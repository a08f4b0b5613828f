"""TopK SAE training throughput: ours vs a dense PyTorch reference, sparsify and SAELens, and vs the GEMM limit.

One training step = forward + backward + Adam (+ each library's decoder-norm handling), batch 4096 tokens,
d_in 576, k 32, d_sae 9216 and 18432, fp32 and bf16, all measured in one run:

- ours:    darkmatter.sae.train.Trainer.train_step (sparse kernels of darkmatter.sae.kernels, the real training step);
- dense:   the same SAE through its dense autograd forward (Sae.forward: topk → scatter → dense matmul);
- sparsify: EleutherAI ``SparseCoder`` (pip eai-sparsify, eager CPU path, SPARSIFY_DISABLE_TRITON=1) with its
  trainer's step: unit-norm decoder, fvu loss, parallel-gradient removal;
- saelens: ``TopKTrainingSAE.training_forward_pass`` with SAELens' SAETrainer step (firing statistics,
  grad-norm clipping at 1).

All four start from the same weights (our initialisation), use the same Adam (torch, fused, lr
2e-4/√(d_sae/2¹⁴), betas 0.9/0.999, eps 6.25e-10) and see the same batches, so their held-out FVU after the
timed steps is comparable: ours, dense and sparsify compute the same function and should agree to
``LOSS_RTOL``; SAELens optimises a differently scaled loss (un-normalised MSE, free decoder norms, clipped
gradients) and is reported only. bf16 = CPU autocast for the peers, a bf16 encoder GEMM for ours.
Limit: tokens/s if the step cost exactly one encoder GEMM at the measured GEMM peak, i.e.
peak_flops / (2·d_in·d_sae). Trials are interleaved (ours, dense, sparsify, saelens, gemm, ours, ...) and
medians reported because the machine's 2 cores are shared. Peers run only where importable (``pip install
-e .[bench]`` in a separate venv, see the README); a missing peer is skipped with a message.

    python -m bench.sae_train [--widths 9216 18432] [--trials 5] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from darkmatter.config import SaeTrainingConfig  # noqa: E402
from darkmatter.sae.families import SaeSpec  # noqa: E402
from darkmatter.sae.model import Sae  # noqa: E402
from darkmatter.sae.objectives import batch_variance  # noqa: E402
from darkmatter.sae.train import Trainer, default_lr  # noqa: E402

# ours / dense / sparsify compute the same function from the same start on the same batches; they differ by
# float rounding (bf16: also which GEMMs run in bf16) and by ties in bf16 top-k, so after a few steps their
# held-out FVU agrees to ~0.1% and its drop since the start to a few %: 2% / 10% leave room for noise, while
# a wrong gradient (e.g. a missing b_dec or encoder term) changes the drop by far more.
LOSS_RTOL, DROP_RTOL = 0.02, 0.10
D_IN, K, BATCH = 576, 32, 4096
ADAM = {"betas": (0.9, 0.999), "eps": 6.25e-10, "fused": True}


@dataclass
class Method:
    name: str
    step: Callable[[torch.Tensor], None]
    fvu: Callable[[torch.Tensor], float]


def load_data(rows: int) -> tuple[np.ndarray, str]:
    """Real d_model-576 activations of a finished harvest when present, else a synthetic sparse mixture."""
    metas = sorted(Path("results").glob("*/activations/*/meta.json"), key=lambda p: (p.parent.name != "train", p))
    for meta in metas:
        info = json.loads(meta.read_text())
        for hook, d in info["d_model"].items():
            if d == D_IN and info["rows"] >= rows:
                arr = np.load(meta.parent / f"{hook}.npy", mmap_mode="r", allow_pickle=False)
                return np.ascontiguousarray(arr[:rows]), f"{meta.parent}/{hook}.npy"
    gen = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(8192, D_IN, generator=gen), dim=1)
    idx = torch.randint(0, 8192, (rows, 40), generator=gen)
    acts = torch.rand(rows, 40, generator=gen) * 3
    x = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=acts, mode="sum") + 0.5
    return x.numpy(), "synthetic (8192 unit atoms, 40 active, uniform 0–3)"


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / batch_variance(x))


def make_ours(data: np.ndarray, d_sae: int, bf16: bool) -> tuple[Method, Sae]:
    cfg = SaeTrainingConfig(tokens=BATCH * 10_000, batch_size=BATCH, warmup_steps=0, decay_start=1.0,
                            input_scaling="none", precision="bfloat16" if bf16 else "float32")
    tr = Trainer(data, SaeSpec("topk", d_sae, K, 0), cfg)

    def fvu(x: torch.Tensor) -> float:
        with torch.no_grad():
            return _fvu(x, tr.sae(x).x_hat)

    return Method("ours", lambda x: tr.train_step(x), fvu), Sae.from_tensors(tr.sae.cfg, tr.sae.tensors())


def _unit_decoder_step(params, W_dec: torch.nn.Parameter, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        g = W_dec.grad
        g.sub_(W_dec * (g * W_dec).sum(1, keepdim=True))
        opt.step()
        W_dec.div_(W_dec.norm(dim=1, keepdim=True))


def make_dense(init: Sae, bf16: bool) -> Method:
    sae = Sae.from_tensors(init.cfg, init.tensors())
    opt = torch.optim.Adam(sae.parameters(), lr=default_lr(sae.d_sae), **ADAM)

    def step(x: torch.Tensor) -> None:
        with _autocast(bf16):
            x_hat = sae(x).x_hat
        loss = (x - x_hat.float()).pow(2).sum() / batch_variance(x)
        _unit_decoder_step(sae.parameters(), sae.W_dec, opt, loss)

    def fvu(x: torch.Tensor) -> float:
        with torch.no_grad():
            return _fvu(x, sae(x).x_hat)

    return Method("dense", step, fvu)


def make_sparsify(init: Sae, bf16: bool) -> Method | None:
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as e:
        print(f"skipping sparsify: not importable ({e}); install the bench extra in a separate venv")
        return None
    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=init.d_sae, k=K), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        sae.encoder.weight.copy_(init.W_enc.t())
        sae.encoder.bias.copy_(init.b_enc)
        sae.W_dec.copy_(init.W_dec)
        sae.b_dec.copy_(init.b_dec)
    opt = torch.optim.Adam(sae.parameters(), lr=default_lr(init.d_sae), **ADAM)

    def step(x: torch.Tensor) -> None:  # sparsify.trainer.Trainer.fit, one step, auxk off (its default)
        sae.set_decoder_norm_to_unit_norm()
        with _autocast(bf16):
            out = sae(x, dead_mask=None)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fvu(x: torch.Tensor) -> float:
        with torch.no_grad():
            return _fvu(x, sae(x).sae_out)

    return Method("sparsify", step, fvu)


def make_saelens(init: Sae, bf16: bool) -> Method | None:
    try:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except ImportError as e:
        print(f"skipping sae-lens: not importable ({e}); install the bench extra in a separate venv")
        return None
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=init.d_sae, k=K, dtype="float32", device="cpu"))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(init, name))
    opt = torch.optim.Adam(sae.parameters(), lr=default_lr(init.d_sae), **ADAM)
    since_fired = torch.zeros(init.d_sae)
    n_steps = [0]

    def step(x: torch.Tensor) -> None:  # sae_lens.training.sae_trainer.SAETrainer._train_step
        sae.train()
        with _autocast(bf16):
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                           n_training_steps=n_steps[0], is_logging_step=False))
            with torch.no_grad():
                did_fire = out.feature_acts.bool().float().sum(-2).bool()
                since_fired.add_(1)
                since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        n_steps[0] += 1

    def fvu(x: torch.Tensor) -> float:
        with torch.no_grad():
            return _fvu(x, sae(x))

    return Method("saelens", step, fvu)


def gemm_flops(dtype: torch.dtype, n: int = 3072) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    t = time.perf_counter()
    a @ b
    return 2 * n**3 / (time.perf_counter() - t)


def run_config(data: np.ndarray, d_sae: int, bf16: bool, trials: int, steps: int) -> dict:
    ours, init = make_ours(data, d_sae, bf16)
    methods = [m for m in (ours, make_dense(init, bf16), make_sparsify(init, bf16), make_saelens(init, bf16)) if m]
    n_batches = 1 + trials * steps
    batches = [torch.tensor(data[i * BATCH : (i + 1) * BATCH], dtype=torch.float32) for i in range(n_batches)]
    held_out = torch.tensor(data[n_batches * BATCH : (n_batches + 1) * BATCH], dtype=torch.float32)
    fvu0 = ours.fvu(held_out)
    for m in methods:  # warm-up step (allocations, Adam state)
        m.step(batches[0])
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    peak: list[float] = []
    dtype = torch.bfloat16 if bf16 else torch.float32
    for trial in range(trials):
        for m in methods:
            t = time.perf_counter()
            for s in range(steps):
                m.step(batches[1 + trial * steps + s])
            times[m.name].append(steps * BATCH / (time.perf_counter() - t))
        peak.append(gemm_flops(dtype))
    tok_s = {name: statistics.median(v) for name, v in times.items()}
    fvu = {m.name: m.fvu(held_out) for m in methods}
    limit = max(peak) / (2 * D_IN * d_sae)
    # same trajectory: the held-out FVU and its drop since the common start agree with the dense reference
    drop = {name: fvu0 - v for name, v in fvu.items()}
    matched = {name: abs(fvu[name] - fvu["dense"]) <= LOSS_RTOL * fvu["dense"]
               and abs(drop[name] - drop["dense"]) <= DROP_RTOL * abs(drop["dense"])
               for name in ("ours", "sparsify") if name in fvu}
    ratios = {f"ours/{name}": tok_s["ours"] / tok_s[name] for name in tok_s if name != "ours"}
    return {
        "d_sae": d_sae, "dtype": "bf16" if bf16 else "fp32", "tokens_per_s": tok_s, "tokens_per_s_trials": times,
        "ratios": ratios, "gemm_peak_gflops": max(peak) / 1e9, "gemm_median_gflops": statistics.median(peak) / 1e9,
        "limit_tokens_per_s": limit, "ours_share_of_limit": tok_s["ours"] / limit,
        "heldout_fvu_initial": fvu0, "heldout_fvu": fvu, "heldout_fvu_drop": drop, "loss_matches_dense": matched, "steps": n_batches,
        "accept": {"ours>=1.3x_sparsify": ratios.get("ours/sparsify", float("nan")) >= 1.3,
                   "ours>=3x_dense": ratios["ours/dense"] >= 3.0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[9216, 18432])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per method per trial")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/out/sae_train.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data, source = load_data(BATCH * (2 + args.trials * args.steps) + BATCH)
    print(f"data: {source}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    results = []
    for d_sae in args.widths:
        for bf16 in (False, True):
            r = run_config(data, d_sae, bf16, args.trials, args.steps)
            results.append(r)
            tps = "  ".join(f"{k} {v:8.0f}" for k, v in r["tokens_per_s"].items())
            rat = "  ".join(f"{k} {v:5.2f}x" for k, v in r["ratios"].items())
            print(f"d_sae {d_sae:6d} {r['dtype']}: tok/s {tps} | {rat} | limit {r['limit_tokens_per_s']:.0f} "
                  f"(ours {100 * r['ours_share_of_limit']:.0f}%) | fvu {json.dumps({k: round(v, 4) for k, v in r['heldout_fvu'].items()})}",
                  flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": source, "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "batch": BATCH, "d_in": D_IN, "k": K, "loss_rtol": LOSS_RTOL, "drop_rtol": DROP_RTOL,
                               "load_average_end": os.getloadavg(), "results": results}, indent=2) + "\n")
    print(f"\n{'d_sae':>6} {'dtype':>5} " + " ".join(f"{n:>10}" for n in ("ours", "dense", "sparsify", "saelens"))
          + f" {'/dense':>7} {'/sparsify':>9} {'/saelens':>8} {'limit':>8} {'share':>6}")
    for r in results:
        t, q = r["tokens_per_s"], r["ratios"]
        print(f"{r['d_sae']:>6} {r['dtype']:>5} " + " ".join(f"{t.get(n, float('nan')):>10.0f}"
                                                            for n in ("ours", "dense", "sparsify", "saelens"))
              + f" {q.get('ours/dense', float('nan')):>6.2f}x {q.get('ours/sparsify', float('nan')):>8.2f}x"
              + f" {q.get('ours/saelens', float('nan')):>7.2f}x {r['limit_tokens_per_s']:>8.0f}"
              + f" {100 * r['ours_share_of_limit']:>5.0f}%")
    print(f"written {out}")


if __name__ == "__main__":
    main()
