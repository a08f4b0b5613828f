"""Linear error prediction for an SAE family: shared design + sparse structure vs scikit-learn per SAE, in one run.

Data: N synthetic activations [N, 576] (a sparse sum of unit features with exponential magnitudes, plus
correlated Gaussian noise and a nonzero mean with three large dimensions), and 10 TopK SAEs (k = 32, widths 1k–16k
log-spaced, random unit decoder rows, W_enc = W_decᵀ, b_dec = mean of x) whose codes come from the TopK encoder.
Fit/test split: the paper's (150k shuffled rows, the rest held out).

Contenders, interleaved over ``--repeats`` rounds (medians reported):
- ``family_<method>``: darkmatter.errors.decompose_family over all SAEs — one pass over x for the family,
  x statistics and factorisations shared (b*, test R² of the error vector and of ‖error‖², with and without
  intercept, FVU_total / FVU_nonlinear); method auto (= dense GEMM cross moments at d = 576, k = 32) / sparse
  (cross moments from the codes) / dense.
- ``generic``: darkmatter.regression.heldout_r2 on one SAE's dense error (float32 array), nothing shared.
- ``sklearn``: LinearRegression().fit on the fit rows + predict + r2_score on the test rows, per SAE, on float64
  copies of x and of the same dense errors (copies made outside the timing; float64 so that the R² comparison
  measures our numerics, not float32 lstsq).

Memory: fresh subprocesses at N/2 and N tokens (fit fraction 0.6) measure the peak RSS above the resident inputs
(VmHWM after resetting it via /proc/self/clear_refs) of each family method and of sklearn's fit of one SAE.

    python -m bench.regression [--tokens 250000] [--repeats 3] [--out bench/out/regression.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from darkmatter.errors.decompose import decompose_family, sparse_pays
from darkmatter.regression import heldout_r2, split_mask
from darkmatter.sae.codes import SparseCodes

D_MODEL = 576
CACHE = Path("bench/out/regression-cache")


# --------------------------------------------------------------------------------------------- synthetic data


def make_activations(n: int, d: int, seed: int, chunk: int = 16_384) -> np.ndarray:
    """float32 [n, d]: Σ of 48 of 8192 unit features (Zipf-like frequencies, Exp(1)·2 magnitudes) + noise + mean."""
    g = torch.Generator().manual_seed(seed)
    n_feat, k_true = 8192, 48
    feats = torch.randn(n_feat, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    cdf = torch.cumsum(1 / (torch.arange(n_feat) + 10.0), 0)
    cdf /= cdf[-1].clone()
    mix = torch.linalg.qr(torch.randn(d, d, generator=g))[0] * torch.logspace(0, -2, d)[None, :]  # decaying spectrum
    mean = 2 * torch.randn(d, generator=g)
    mean[:3] += 40  # "massive activation" dimensions: |mean| ≫ spread
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, chunk):
        c = min(chunk, n - s)
        idx = torch.searchsorted(cdf, torch.rand(c, k_true, generator=g)).clamp_max(n_feat - 1)
        mags = 2 * torch.empty(c, k_true).exponential_(generator=g)
        x = torch.nn.functional.embedding_bag(idx, feats, per_sample_weights=mags, mode="sum")
        out[s : s + c] = (x + 0.5 * torch.randn(c, d, generator=g) @ mix.T + mean).numpy()
    return out


def make_sae_codes(x: np.ndarray, width: int, k: int, seed: int, chunk: int = 2048) -> tuple[np.ndarray, ...]:
    """A random TopK SAE (unit decoder rows, W_enc = W_decᵀ, b_dec = mean x): (indices int32, values, W_dec, b_dec)."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(width, x.shape[1], generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    b_dec = torch.from_numpy(x[:65536].mean(0, dtype=np.float64).astype(np.float32))
    idx = np.empty((x.shape[0], k), dtype=np.int32)
    val = np.empty((x.shape[0], k), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, x.shape[0], chunk):
            pre = (torch.from_numpy(x[s : s + chunk]) - b_dec) @ W_dec.T
            v, i = pre.topk(k, dim=1, sorted=False)
            idx[s : s + chunk], val[s : s + chunk] = i.numpy(), v.relu().numpy()
    return idx, val, W_dec.numpy(), b_dec.numpy()


def widths_for(n_saes: int) -> list[int]:
    return [int(round(w / 64)) * 64 for w in np.geomspace(1024, 16384, n_saes)]


def build_cache(args: argparse.Namespace) -> None:
    """Write x and every SAE's codes as .npy under CACHE (reused by reruns and the memory subprocesses)."""
    key = {"tokens": args.tokens, "k": args.k, "n_saes": args.n_saes, "seed": args.seed, "d": D_MODEL}
    meta_path = CACHE / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == key:
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x = make_activations(args.tokens, D_MODEL, args.seed)
    np.save(CACHE / "x.npy", x)
    for i, w in enumerate(widths_for(args.n_saes)):
        idx, val, W_dec, b_dec = make_sae_codes(x, w, args.k, args.seed + 1 + i)
        np.savez(CACHE / f"sae{i}.npz", idx=idx, val=val, W_dec=W_dec, b_dec=b_dec)
        print(f"  encoded SAE {i} (width {w}) at {time.perf_counter() - t0:.0f} s", flush=True)
    meta_path.write_text(json.dumps(key))


def load(n: int | None, n_saes: int) -> tuple[np.ndarray, list[SparseCodes]]:
    """x and the SAE codes of the first n tokens, copied into RAM (not memmaps: RSS must not count page cache)."""
    x = np.array(np.load(CACHE / "x.npy", mmap_mode="r", allow_pickle=False)[:n])
    saes = []
    for i in range(n_saes):
        with np.load(CACHE / f"sae{i}.npz", allow_pickle=False) as z:
            saes.append(SparseCodes(np.array(z["idx"][:n]), np.array(z["val"][:n]), z["W_dec"], z["b_dec"]))
    return x, saes


# --------------------------------------------------------------------------------------------- contenders


def sklearn_fit(x_fit: np.ndarray, x_test: np.ndarray, e_fit: np.ndarray, e_test: np.ndarray) -> dict:
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    model = LinearRegression().fit(x_fit, e_fit)
    pred = model.predict(x_test)
    return {"per_dim": r2_score(e_test, pred, multioutput="raw_values"),
            "r2_mean_dims": float(r2_score(e_test, pred)),
            "r2_pooled": float(r2_score(e_test, pred, multioutput="variance_weighted"))}


def dense_error(x: np.ndarray, codes: SparseCodes) -> np.ndarray:
    return (torch.from_numpy(x) - codes.x_hat(slice(None))).numpy()


def r2_diff(ours, ref: dict) -> dict[str, float]:
    return {"per_dim_max": float(np.max(np.abs(ours.per_dim - ref["per_dim"]))),
            "mean_dims": abs(ours.r2_mean_dims - ref["r2_mean_dims"]), "pooled": abs(ours.r2_pooled - ref["r2_pooled"])}


# --------------------------------------------------------------------------------------------- memory probe


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def probe_memory(n: int, n_saes: int, which: str) -> dict:
    """Peak RSS above the resident inputs of one contender on the first n tokens (run in a fresh process)."""
    x, saes = load(n, n_saes)
    mask = split_mask(n, int(0.6 * n), 0)
    if which == "sklearn":
        e = dense_error(x, saes[-1]).astype(np.float64)
        x64 = x.astype(np.float64)
        inputs = (x64[mask], x64[~mask], e[mask], e[~mask])
        del e, x64
    baseline = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
    t0 = time.perf_counter()
    if which == "sklearn":
        sklearn_fit(*inputs)
    else:
        decompose_family(x, saes, mask=mask, method=which)
    return {"tokens": n, "contender": which, "extra_peak_rss_mb": (_status_bytes("VmHWM") - baseline) / 2**20,
            "baseline_rss_mb": baseline / 2**20, "seconds": time.perf_counter() - t0}


def run_probe(n: int, n_saes: int, which: str) -> dict:
    cmd = [sys.executable, "-m", "bench.regression", "--probe", str(n), "--probe-which", which,
           "--n-saes", str(n_saes)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=250_000)
    ap.add_argument("--fit-tokens", type=int, default=150_000)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--n-saes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="auto,sparse", help="family methods; auto = dense for d=576, k=32")
    ap.add_argument("--out", default="bench/out/regression.json")
    ap.add_argument("--probe", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--probe-which", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.probe:
        print(json.dumps(probe_memory(args.probe, args.n_saes, args.probe_which)))
        return
    logging.basicConfig(level=logging.WARNING)
    print(f"building data: {args.tokens} × {D_MODEL}, {args.n_saes} TopK SAEs (k={args.k})", flush=True)
    build_cache(args)
    x, saes = load(None, args.n_saes)
    widths = [s.d_sae for s in saes]
    mask = split_mask(args.tokens, args.fit_tokens, 0)
    x_fit, x_test = x[mask].astype(np.float64), x[~mask].astype(np.float64)
    generic_sae = len(saes) - 1  # the widest
    generic_error = dense_error(x, saes[generic_sae])
    methods = args.methods.split(",")

    times: dict[str, list[float]] = {f"family_{m}": [] for m in methods} | {"generic": [], "sklearn": []}
    sk_per_sae: list[list[float]] = [[] for _ in saes]
    ours: dict[str, list] = {}
    sk: list[dict] = []
    generic = None
    for rep in range(args.repeats):
        for m in methods:
            t0 = time.perf_counter()
            ours[m] = decompose_family(x, saes, mask=mask, method=m).fits
            times[f"family_{m}"].append(time.perf_counter() - t0)
            print(f"[{rep}] family {m}: {times[f'family_{m}'][-1]:.1f} s", flush=True)
        t0 = time.perf_counter()
        generic = heldout_r2(x, generic_error, fit_tokens=args.fit_tokens, seed=0)
        times["generic"].append(time.perf_counter() - t0)
        total = 0.0
        sk = []
        for i, codes in enumerate(saes):
            e = dense_error(x, codes).astype(np.float64)
            e_fit, e_test = e[mask], e[~mask]
            del e
            t0 = time.perf_counter()
            sk.append(sklearn_fit(x_fit, x_test, e_fit, e_test))
            dt = time.perf_counter() - t0
            sk_per_sae[i].append(dt)
            total += dt
        times["sklearn"].append(total)
        print(f"[{rep}] generic {times['generic'][-1]:.1f} s | sklearn family {total:.1f} s", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    sk_generic = statistics.median(sk_per_sae[generic_sae])
    diffs = {m: [r2_diff(r.r2_vector, s) for r, s in zip(ours[m], sk, strict=True)] for m in methods}
    assert generic is not None
    generic_diff = r2_diff(generic.r2, sk[generic_sae])
    worst = {m: max(max(d.values()) for d in diffs[m]) for m in methods}

    # norm-sq R² agreement with sklearn (not timed; one scalar target per SAE)
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score
    norm_diff = []
    for i, codes in enumerate(saes):
        nsq = np.square(dense_error(x, codes).astype(np.float64)).sum(1)
        pred = LinearRegression().fit(x_fit, nsq[mask]).predict(x_test)
        norm_diff.append(abs(ours[methods[0]][i].r2_norm_sq.r2_pooled - r2_score(nsq[~mask], pred)))

    print("memory probes (fresh processes) ...", flush=True)
    sizes = [args.tokens // 2, args.tokens]
    mem = [run_probe(n, args.n_saes, w) for w in (*methods, "sklearn") for n in sizes]

    print(f"\n{'contender':<22}{'median s':>10}{'vs sklearn':>12}   repeats")
    for k, v in med.items():
        ref = sk_generic if k == "generic" else med["sklearn"]
        print(f"{k:<22}{v:>10.1f}{ref / v:>11.1f}×   {', '.join(f'{t:.1f}' for t in times[k])}")
    print(f"(generic is compared with sklearn on the same SAE: {sk_generic:.1f} s)")
    print(f"\n{'width':>7}{'R² mean dims':>14}{'R² pooled':>11}{'R² ‖e‖²':>10}{'FVU':>8}{'FVU nonlin':>11}"
          f"{'|ΔR²| max (auto vs sklearn)':>29}")
    for i, w in enumerate(widths):
        r = ours[methods[0]][i]
        print(f"{w:>7}{r.r2_vector.r2_mean_dims:>14.5f}{r.r2_vector.r2_pooled:>11.5f}{r.r2_norm_sq.r2_mean_dims:>10.5f}"
              f"{r.fvu_total:>8.4f}{r.fvu_nonlinear:>11.4f}{max(diffs[methods[0]][i].values()):>29.2e}")
    print("\nworst |ΔR²| vs sklearn (per dim / mean / pooled): "
          + ", ".join(f"{m} {worst[m]:.2e}" for m in methods)
          + f", generic {max(generic_diff.values()):.2e}; ‖e‖² R² {max(norm_diff):.2e}")
    print(f"\n{'memory':<12}{'tokens':>9}{'extra peak RSS MB':>19}{'s':>7}")
    for p in mem:
        print(f"{p['contender']:<12}{p['tokens']:>9}{p['extra_peak_rss_mb']:>19.1f}{p['seconds']:>7.1f}")
    accept = {
        "family_10x": med["sklearn"] / med[f"family_{methods[0]}"] >= 10,
        "generic_2x": sk_generic / med["generic"] >= 2,
        "r2_1e-6": max(max(worst.values()), max(generic_diff.values()), max(norm_diff)) <= 1e-6,
        "memory_flat": all(mem[i + 1]["extra_peak_rss_mb"] <= 1.1 * mem[i]["extra_peak_rss_mb"] + 8
                           for i in range(0, 2 * len(methods), 2)),
    }
    print("\nacceptance:", ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in accept.items()))
    out = {"args": vars(args), "widths": widths, "seconds": times, "median_seconds": med,
           "sklearn_seconds_per_sae": sk_per_sae, "speedup_family_vs_sklearn": {
               m: med["sklearn"] / med[f"family_{m}"] for m in methods},
           "speedup_generic_vs_sklearn_same_sae": sk_generic / med["generic"],
           "r2_abs_diff_vs_sklearn": diffs, "r2_abs_diff_generic": generic_diff, "r2_norm_sq_abs_diff": norm_diff,
           "results": [{"width": w, "r2_mean_dims": r.r2_vector.r2_mean_dims, "r2_pooled": r.r2_vector.r2_pooled,
                        "r2_norm_sq": r.r2_norm_sq.r2_mean_dims, "fvu_total": r.fvu_total,
                        "fvu_nonlinear": r.fvu_nonlinear, "condition_number": r.linear_map.condition_number}
                       for w, r in zip(widths, ours[methods[0]], strict=True)],
           "auto_resolves_to": ["sparse" if sparse_pays(args.k, w, D_MODEL) else "dense" for w in widths],
           "memory": mem, "acceptance": accept}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
