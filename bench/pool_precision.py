"""Would a bf16 training pool change an extra hook's SAE? Measured in one run, against the seed spread.

The default run stores every hook's 2M-token training pool in float32 (4.6 GB each). Storing the extra hooks' pools
in bf16 would halve that, but only if an SAE trained on the rounded pool is the same SAE up to noise. This trains
the SAE of one extra hook (default: the previous layer's residual stream, experiment 11's main predictor) with the
default recipe and seed on the pool rounded to bf16 (round to nearest even, what a bf16 store would hold), and with
another seed on the float32 pool (the noise a change must be judged against), and compares both with the default
run's own SAE (same recipe and seed, float32). For each: the eval FVU and the held-out R² of the primary widest
k = 32 SAE's NonlinearError from its reconstruction (experiment 11's headline, on the decomposition's split).
The verdict is the bf16 change as a fraction of the seed change.

    python -m bench.pool_precision [--exp default] [--hook blocks.14.hook_resid_post] [--other-seed 10] [--tokens N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from darkmatter.config import load_config, stable_hash, to_dict
from darkmatter.data.activations import ActivationStore
from darkmatter.errors.measure import LINEAR_MAP, SPLIT
from darkmatter.errors.metrics import FvuAccumulator
from darkmatter.errors.sources import SOURCE_K, component_rows
from darkmatter.io import load_npy, load_safetensors
from darkmatter.paths import ExperimentPaths
from darkmatter.regression import Design, LazyRows, stream_moments
from darkmatter.sae.codes import load_codes
from darkmatter.sae.families import expand_families, widest
from darkmatter.sae.formats import load_sae
from darkmatter.sae.train import Trainer


class Bf16Pool:
    """A float32 pool read back as a bf16 store would give it: every row rounded to bf16, returned as float32."""

    def __init__(self, data: np.ndarray):
        self.data, self.shape, self.ndim, self.dtype = data, data.shape, 2, np.dtype(np.float32)
        self.filename = getattr(data, "filename", None)

    def __getitem__(self, idx):
        rows = torch.from_numpy(np.array(self.data[idx], dtype=np.float32))
        return rows.to(torch.bfloat16).float().numpy()


class Reconstructions:
    """An SAE's reconstructions of the rows of x, as :class:`LazyRows` (``rows``), that also feed the project's
    streaming FVU (a single pass of stream_moments reads each row once)."""

    def __init__(self, sae, x: np.ndarray):
        self.sae, self.x, self.fvu = sae, x, FvuAccumulator()
        self.rows = LazyRows(x.shape[0], x.shape[1], self.get)

    @torch.no_grad()
    def get(self, sl: slice) -> torch.Tensor:
        rows = torch.from_numpy(np.array(self.x[sl], dtype=np.float32))
        x_hat = self.sae(rows).x_hat
        self.fvu.update(rows, x_hat)
        return x_hat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exp", default="default")
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--hook", default="blocks.14.hook_resid_post")
    ap.add_argument("--other-seed", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=None, help="training tokens (default: the recipe's, which reuses "
                    "the experiment's float32 SAE; any other trains it too)")
    ap.add_argument("--out", default="bench/out/pool_precision.json")
    args = ap.parse_args()
    cfg = load_config(data=yaml.safe_load(Path(args.config).read_text()))
    paths = ExperimentPaths.of(args.exp)
    members = expand_families(cfg.families, cfg.primary_hook)
    member = widest([m for m in members if m.hook == args.hook])
    base = widest([m for m in members if m.hook == cfg.primary_hook and m.spec.k == SOURCE_K])
    training = cfg.training if member.spec.tokens is None else dataclasses.replace(cfg.training,
                                                                                 tokens=member.spec.tokens)
    if args.tokens:
        training = dataclasses.replace(training, tokens=args.tokens)
    pool = ActivationStore(paths.activations("train")).activations(args.hook)
    trained = [("bf16-rounded pool", Bf16Pool(pool), member.spec.seed),
               (f"float32, seed {args.other_seed}", pool, args.other_seed)]
    runs = {}
    published = load_sae(paths.sae(args.hook, member.sae_id))
    if (published.cfg.get("metadata") or {}).get("training_config_hash") == stable_hash(to_dict(training)):
        runs["float32 (the experiment's SAE)"] = (published, 0.0)  # the same recipe and seed: reruns are bitwise equal
    else:  # another recipe (--tokens): train the float32 reference too
        trained.insert(0, ("float32", pool, member.spec.seed))
    for name, data, seed in trained:
        started = time.time()
        result = Trainer(data, dataclasses.replace(member.spec, seed=seed), training).run()
        assert result is not None
        runs[name] = (result.sae, time.time() - started)

    store = ActivationStore(paths.activations("eval"))
    x_src, x = store.activations(args.hook), store.activations(cfg.primary_hook)
    base_sae = load_sae(paths.sae(cfg.primary_hook, base.sae_id))
    lin = load_safetensors(paths.sae_errors(cfg.primary_hook, base.sae_id) / LINEAR_MAP)
    target = component_rows(x, load_codes(paths.codes(cfg.primary_hook, base.sae_id), base_sae),
                            lin["coef"].float(), lin["intercept"].float(), ("nonlinear_error",))
    mask = load_npy(paths.errors(cfg.primary_hook) / SPLIT)
    rows = {}
    for name, (sae, seconds) in runs.items():
        recon = Reconstructions(sae, x_src)
        m = stream_moments(recon.rows, target, mask)
        assert m.x is not None and m.y is not None
        design = Design(m.x[0], m.x[1])
        r2 = design.heldout_r2(design.solve(m.y[0]), m.y[1])
        rows[name] = {"eval_fvu": recon.fvu.fvu, "r2_nonlinear_error_pooled": float(r2.r2_pooled),
                      "train_seconds": seconds}
        print(f"{name:>34}: eval FVU {rows[name]['eval_fvu']:.5f}, R²(NonlinearError of {base.sae_id}) "
              f"{rows[name]['r2_nonlinear_error_pooled']:.5f}")
    ref, bf16, seed = (rows[k] for k in runs)
    ratios = {key: abs(bf16[key] - ref[key]) / abs(seed[key] - ref[key]) if seed[key] != ref[key] else float("nan")
              for key in ("eval_fvu", "r2_nonlinear_error_pooled")}
    for key, ratio in ratios.items():
        print(f"{key}: |bf16 − float32| / |other seed − float32| = {ratio:.3f}")
    out = {"hook": args.hook, "sae_id": member.sae_id, "base_sae_id": base.sae_id,
           "cpu": torch.backends.cpu.get_cpu_capability(), "runs": rows, "bf16_change_over_seed_change": ratios}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
