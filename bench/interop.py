"""Interoperability with the libraries themselves: SAELens opens SAEs darkmatter wrote, and darkmatter opens SAEs
SAELens and sparsify wrote, with the same reconstructions.

Needs the peers (never runtime dependencies), in their own venv:
    python -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 && .venv-bench/bin/pip install -e ".[bench]"
    .venv-bench/bin/python -m bench.interop
Writes bench/out/interop.json: per case, the largest |difference| of the reconstructions (and of the codes where
both sides expose them) on random inputs, relative to the largest |value| (float32 rounding is ~1e-7 per
operation), and the mean L0 (codes that are all zero would agree trivially).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from darkmatter.sae.formats import load_sae
from darkmatter.sae.model import Sae, default_cfg, save_sae

D_IN, D_SAE, K, N = 64, 256, 8, 512
TOLERANCE = 1e-5  # relative to the largest |value|: float32 sums of 64–256 terms in a different order
OUT = Path(__file__).parent / "out" / "interop.json"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _l0(latents: torch.Tensor) -> float:
    """Mean active latents per token: a comparison of all-zero codes would agree trivially."""
    return float((latents != 0).sum(1).float().mean())


def _random_sae(arch: str, gen: torch.Generator) -> Sae:
    w_enc = torch.randn(D_IN, D_SAE, generator=gen) / D_IN**0.5
    tensors = {"W_enc": w_enc, "b_enc": 0.1 * torch.randn(D_SAE, generator=gen),
               "W_dec": (w_enc.T / w_enc.T.norm(dim=1, keepdim=True)).contiguous(),
               "b_dec": 0.1 * torch.randn(D_IN, generator=gen)}
    if arch == "jumprelu":
        tensors["threshold"] = 0.05 + 0.1 * torch.rand(D_SAE, generator=gen)
    # as train_sae writes them: with the hook and model they were trained on
    return Sae.from_tensors(default_cfg(arch, D_IN, D_SAE, k=K, hook_name="blocks.3.hook_resid_post",
                                        model_name="tiny"), tensors)


def ours_opened_by_saelens(folder: Path, gen: torch.Generator) -> dict[str, dict]:
    from sae_lens import SAE

    out = {}
    for arch in ("topk", "jumprelu", "relu"):
        ours = _random_sae(arch, gen)
        save_sae(ours, folder / arch)
        theirs = SAE.load_from_disk(str(folder / arch), device="cpu")
        x = torch.randn(N, D_IN, generator=gen)
        with torch.no_grad():
            mine = ours(x)
            f = theirs.encode(x)
            out[f"darkmatter {arch} -> SAELens {type(theirs).__name__}"] = {
                "codes": _rel(f, mine.latents),
                "reconstruction": _rel(theirs.decode(f), mine.x_hat), "l0": _l0(mine.latents)}
    return out


def saelens_opened_by_ours(folder: Path, gen: torch.Generator) -> dict[str, dict]:
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    out = {}
    for name, sae in (("topk", TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))),
                      ("jumprelu", JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))),
                      ("standard", StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)))):
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen) + (0.05 if p.ndim == 1 else 0))
        sae.save_model(str(folder / f"saelens_{name}"))
        ours = load_sae(folder / f"saelens_{name}")
        x = torch.randn(N, D_IN, generator=gen)
        with torch.no_grad():
            mine = ours(x)
            out[f"SAELens {name} -> darkmatter {ours.architecture}"] = {
                "reconstruction": _rel(mine.x_hat, sae.decode(sae.encode(x))), "l0": _l0(mine.latents)}
    return out


def sparsify_opened_by_ours(folder: Path, gen: torch.Generator) -> dict[str, dict]:
    from sparsify import Sae as SparsifySae
    from sparsify import SaeConfig

    sae = SparsifySae(D_IN, SaeConfig(expansion_factor=D_SAE // D_IN, k=K))
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(D_IN, generator=gen))
    sae.save_to_disk(folder / "sparsify" / "layers.3")
    ours = load_sae(folder / "sparsify" / "layers.3")
    x = torch.randn(N, D_IN, generator=gen)
    with torch.no_grad():
        mine = ours(x)
        return {f"sparsify TopK -> darkmatter {ours.architecture}": {
            "reconstruction": _rel(mine.x_hat, sae(x).sae_out), "l0": _l0(mine.latents)}}


def main() -> None:
    import sae_lens
    import sparsify

    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases = {**ours_opened_by_saelens(folder, gen), **saelens_opened_by_ours(folder, gen),
                 **sparsify_opened_by_ours(folder, gen)}
    report = {"torch": torch.__version__, "sae_lens": sae_lens.__version__,
              "sparsify": getattr(sparsify, "__version__", "?"), "tolerance": TOLERANCE,
              "cases": {name: {**diffs, "ok": diffs["l0"] >= 1 and all(v <= TOLERANCE for k, v in diffs.items()
                                                                            if k != "l0")}
                        for name, diffs in cases.items()}}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    for name, case in report["cases"].items():
        print(f"{'ok ' if case['ok'] else 'BAD'} {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in case.items()
                                                                      if k != "ok"))
    if not all(c["ok"] for c in report["cases"].values()):
        raise SystemExit("some SAEs do not round-trip; see bench/out/interop.json")


if __name__ == "__main__":
    main()
