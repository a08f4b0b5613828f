"""Each device step on ``--device`` against the same step on the CPU: the check to run on a machine with a GPU.

CI has no GPU, so the CUDA paths of darkmatter.device are exercised here rather than in the tests: a tiny random
model and planted SAE data run through harvest (float32 and bf16 autocast), SAE training (every architecture),
encoding, gradient pursuit, the CE splice and the error-SAE components, once on the CPU and once on the device.
Results must agree to float rounding (float32) or bf16 rounding; each line printed is one comparison with its
tolerance, and the exit status is 1 if any fails. ``--device cpu`` compares the CPU with itself (all exact).

    python -m bench.device_check --device cuda [--out device_check.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from darkmatter.config import RandomModelConfig, SaeTrainingConfig
from darkmatter.data.activations import ActivationStore
from darkmatter.data.harvest import HarvestSpec, harvest
from darkmatter.data.models import build_random_model, load_model
from darkmatter.device import device_record, resolve_device
from darkmatter.downstream.ce import SplicedSae, conditions, measure_ce
from darkmatter.errors.error_saes import ErrorComponents
from darkmatter.errors.pursuit import pursue
from darkmatter.precision import resolve_precision
from darkmatter.sae.codes import encode
from darkmatter.sae.families import SaeSpec
from darkmatter.sae.train import Trainer

HOOK = "blocks.1.hook_resid_post"


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖ / ‖b‖ (0 when both are 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device, cpu = resolve_device(args.device), torch.device("cpu")
    rows: list[dict] = []

    def check(name: str, value: float, limit: float, seconds: dict | None = None) -> None:
        rows.append({"check": name, "value": value, "limit": limit, "ok": bool(value <= limit), **(seconds or {})})
        print(f"{'ok  ' if value <= limit else 'FAIL'} {name}: {value:.3g} (limit {limit:g}) {seconds or ''}")

    def timed(fn, *a, **kw):
        start = time.perf_counter()
        out = fn(*a, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, round(time.perf_counter() - start, 3)

    tmp = Path(tempfile.mkdtemp())
    build_random_model(RandomModelConfig(n_layers=2, d_model=64, n_heads=4, d_ff=128), tmp / "m")
    models = {d: load_model(str(tmp / "m"), device=d)[0] for d in (cpu, device)}
    tokens = np.random.default_rng(0).integers(3, 250, (16, 128)).astype(np.int32)
    tokens[:, 0] = 1

    # harvest: float32, then bf16 autocast (the precision auto picks on a bf16 GPU)
    for bf16, limit in ((False, 1e-4), (True, 5e-2)):
        spec = HarvestSpec((HOOK,), 16, 4, bf16, True)
        stores, secs = {}, {}
        for d in (cpu, device):
            out, secs[d.type] = timed(harvest, models[d], tokens, spec, tmp / f"h{bf16}{d}", progress=False)
            stores[d] = ActivationStore(out)
        x_cpu, x_dev = (np.asarray(stores[d].activations(HOOK)) for d in (cpu, device))
        check(f"harvest bf16={bf16}: activations rel. error", rel(x_dev, x_cpu), limit, secs)
        loss = [stores[d].index()["loss"].to_numpy() for d in (cpu, device)]
        ok = ~np.isnan(loss[0])
        check(f"harvest bf16={bf16}: loss rel. error", rel(loss[1][ok], loss[0][ok]), limit)
    x = np.asarray(ActivationStore(tmp / f"hFalse{cpu}").activations(HOOK))

    # training: every architecture, float32 and bf16 matmuls; same init, so the runs stay close for a few steps
    cfg = SaeTrainingConfig(tokens=256 * 30, batch_size=256, buffer_tokens=2048, warmup_steps=5, dead_tokens=256,
                            log_every=10)
    saes = {}
    for arch in ("topk", "batchtopk", "relu", "jumprelu"):
        for precision in ("float32", "bfloat16"):
            spec, run_cfg = SaeSpec(arch, 512, 8, 0), dataclasses.replace(cfg, precision=precision)
            res, secs = {}, {}
            for d in (cpu, device):
                res[d], secs[d.type] = timed(Trainer(x, spec, run_cfg, device=d).run, progress=False)
            fvu = [float(res[d].log["fvu"][-1]) for d in (cpu, device)]
            check(f"train {arch} {precision}: |final batch FVU difference|", abs(fvu[1] - fvu[0]),
                  0.01 if precision == "float32" else 0.03, secs)
            if precision == "float32":
                saes[arch] = res[device].sae  # folded on the CPU whatever trained it
    # encoding, pursuit, CE and the error components of one SAE, on either device
    sae = saes["topk"]
    on = {cpu: sae, device: type(sae).from_tensors(sae.cfg, sae.tensors()).to(device)}  # a copy on the device
    codes = {d: timed(encode, on[d], x) for d in (cpu, device)}
    same = float(np.mean(np.sort(codes[cpu][0][0], 1) == np.sort(codes[device][0][0], 1)))
    check("encode topk: fraction of differing code indices", 1 - same, 1e-3, {d.type: codes[d][1] for d in codes})
    l0 = torch.from_numpy((codes[cpu][0][1] != 0).sum(1).astype(np.int64))
    pursued = {d: timed(pursue, on[d], x[:512], l0[:512], progress=False) for d in (cpu, device)}
    check("pursuit: values rel. error", rel(pursued[device][0][1], pursued[cpu][0][1]), 1e-3,
          {d.type: pursued[d][1] for d in pursued})
    lin = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    mean = torch.from_numpy(x.mean(0))
    tables = {}
    for d in (cpu, device):
        spliced = {"topk": SplicedSae(lambda v, s=on[d]: s(v).x_hat, lin.to(d), torch.zeros(64, device=d))}
        tables[d], secs_d = timed(measure_ce, models[d], tokens, np.arange(4), HOOK, 16,
                                  conditions(spliced, mean.to(d)), progress=False)
        rows.append({"check": f"measure_ce seconds on {d.type}", "seconds": secs_d})
    check("CE splice: max |CE difference| (nats)",
          float(np.abs(tables[device]["ce"].to_numpy() - tables[cpu]["ce"].to_numpy()).max()), 1e-3)
    check("CE splice: max |KL difference| (nats)",
          float(np.abs(tables[device]["kl"].to_numpy() - tables[cpu]["kl"].to_numpy()).max()), 1e-3)
    comps = {d: ErrorComponents(on[d], lin.to(d), torch.zeros(64, device=d))(torch.from_numpy(x[:2048]))
             for d in (cpu, device)}
    for name in comps[cpu]:
        check(f"error component {name}: rel. error", rel(comps[device][name].cpu().numpy(),
                                                         comps[cpu][name].numpy()), 1e-4)
    summary = {"device": device_record(device, args.device),
               "precision_auto": resolve_precision("auto", device).record(), "checks": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    failed = [r["check"] for r in rows if r.get("ok") is False]
    print(f"{len(failed)} of {sum('ok' in r for r in rows)} checks failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
