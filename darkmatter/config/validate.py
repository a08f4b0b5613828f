"""Checks that types alone cannot make: ranges, cross-field constraints, hooks against the model; and loading."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import yaml

from darkmatter.config.parse import ConfigError, from_dict
from darkmatter.config.sections import ExperimentConfig, ModelConfig

DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")  # the device setting's forms (darkmatter.device resolves them)
HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_mlp_out|hook_attn_out)$")
EMBEDDED_N_LAYERS = 30
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # experiment and family names: file names, never paths


def hook_layer(hook: str) -> int:
    """The block index of a TransformerLens-style hook name (``blocks.15.hook_resid_post`` → 15)."""
    m = HOOK_RE.match(hook)
    if not m:
        raise ConfigError(
            f"unknown hook {hook!r}; expected 'blocks.<L>.hook_resid_post', 'blocks.<L>.hook_mlp_out' "
            "or 'blocks.<L>.hook_attn_out'."
        )
    return int(m.group(1))


def previous_residual(hook: str) -> str | None:
    """The residual stream after the block before ``hook``'s (``blocks.14.hook_resid_post`` for any hook of block
    15): the earlier layer whose SAE the paper asks to predict a layer's error from. None in block 0."""
    layer = hook_layer(hook)
    return f"blocks.{layer - 1}.hook_resid_post" if layer > 0 else None


def model_n_layers(model: ModelConfig, where: str = "config") -> int | None:
    """Number of blocks, when it can be known offline and cheaply (None for hub models)."""
    if model.source == "embedded":
        return EMBEDDED_N_LAYERS
    if model.source == "random":
        return model.random.n_layers
    if model.source == "local":
        cfg_path = Path(model.path or "") / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(
                f"{where}: key 'model.path': {cfg_path} does not exist; expected a Hugging Face model folder."
            )
        cfg = json.loads(cfg_path.read_text())
        cfg = cfg.get("text_config", cfg)
        return cfg.get("num_hidden_layers", cfg.get("n_layer"))
    return None


def _require(cond: bool, where: str, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{where}: key '{key}' must be {expected}, got {value!r}.")


def validate(cfg: ExperimentConfig, where: str = "config") -> ExperimentConfig:
    """Check values that types alone cannot: ranges, cross-field constraints, hooks against the model."""
    h, c, t, m = cfg.harvest, cfg.corpus, cfg.training, cfg.model
    # the name is a folder (results/<name>, reports/<name>): never '..', a hidden folder or a path
    _require(NAME_RE.fullmatch(cfg.name) is not None, where, "name",
             "letters, digits, '_', '-' or '.', not starting with '.'", cfg.name)
    _require(DEVICE_RE.fullmatch(cfg.device) is not None, where, "device", "auto, cpu, cuda or cuda:<index>",
             cfg.device)
    _require(m.source != "local" or bool(m.path), where, "model.path", "a folder when model.source is 'local'", m.path)
    for key in ("n_layers", "d_model", "n_heads", "d_ff"):
        _require(getattr(m.random, key) >= 1, where, f"model.random.{key}", ">= 1", getattr(m.random, key))
    _require(m.random.d_model % m.random.n_heads == 0, where, "model.random.d_model",
             "a multiple of model.random.n_heads", m.random.d_model)
    _require(len(c.sources) > 0, where, "corpus.sources", "a non-empty list", c.sources)
    _require(0 < c.eval_fraction < 1, where, "corpus.eval_fraction", "strictly between 0 and 1", c.eval_fraction)
    for key in ("text_field", "hf_split"):
        _require(bool(getattr(c, key)), where, f"corpus.{key}", "a non-empty string", getattr(c, key))
    for key in ("hf_config", "hf_revision"):
        _require(getattr(c, key) is None or bool(getattr(c, key)), where, f"corpus.{key}", "null or a non-empty string",
                 getattr(c, key))
    _require(c.shuffle_window >= 1, where, "corpus.shuffle_window", ">= 1 (documents)", c.shuffle_window)
    hf = [s for s in c.sources if s.startswith("hf:")]
    if hf and importlib.util.find_spec("datasets") is None:  # say it before the model is prepared, not after
        raise ConfigError(f"{where}: key 'corpus.sources': {hf[0]!r} needs the package 'datasets' (pip install datasets).")
    _require(len(h.hooks) > 0, where, "harvest.hooks", "a non-empty list", h.hooks)
    _require(h.context_size >= 2, where, "harvest.context_size", ">= 2", h.context_size)
    _require(0 <= h.min_pos < h.context_size - 1, where, "harvest.min_pos",
             f"between 0 and context_size - 2 ({h.context_size - 2})", h.min_pos)
    _require(1 <= h.train_min_pos < h.context_size, where, "harvest.train_min_pos",
             f">= 1 (position 0 is an attention sink) and < context_size ({h.context_size})", h.train_min_pos)
    _require(h.eval_contexts >= 1, where, "harvest.eval_contexts", ">= 1", h.eval_contexts)
    _require(h.train_tokens >= 1, where, "harvest.train_tokens", ">= 1", h.train_tokens)
    _require(h.batch_contexts >= 1, where, "harvest.batch_contexts", ">= 1", h.batch_contexts)
    n_layers = model_n_layers(m, where)
    for i, hook in enumerate(h.hooks):
        try:
            layer = hook_layer(hook)
        except ConfigError as e:
            raise ConfigError(f"{where}: key 'harvest.hooks[{i}]': {e}") from None
        if n_layers is not None:
            _require(layer < n_layers, where, f"harvest.hooks[{i}]",
                     f"a block index below the model's {n_layers} blocks", hook)
    _require(t.tokens >= t.batch_size, where, "training.tokens", f">= training.batch_size ({t.batch_size})", t.tokens)
    _require(t.batch_size >= 1, where, "training.batch_size", ">= 1", t.batch_size)
    _require(t.lr is None or t.lr > 0, where, "training.lr", "> 0 or null", t.lr)
    _require(t.lr_base > 0, where, "training.lr_base", "> 0", t.lr_base)
    _require(t.lr_width_exponent >= 0, where, "training.lr_width_exponent", ">= 0", t.lr_width_exponent)
    _require(0 <= t.decay_start <= 1, where, "training.decay_start", "between 0 and 1", t.decay_start)
    _require(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), where, "training.adam_betas",
             "two numbers in [0, 1)", t.adam_betas)
    for key in ("warmup_steps", "dead_tokens", "buffer_tokens", "log_every", "checkpoint_every"):
        _require(getattr(t, key) >= (0 if key == "warmup_steps" else 1), where, f"training.{key}",
                 ">= 0" if key == "warmup_steps" else ">= 1", getattr(t, key))
    for key in ("auxk_coef", "l1_coef", "l1_adapt_rate", "l0_coef"):
        _require(getattr(t, key) >= 0, where, f"training.{key}", ">= 0", getattr(t, key))
    for key in ("jumprelu_bandwidth", "jumprelu_init_threshold", "adam_eps"):
        _require(getattr(t, key) > 0, where, f"training.{key}", "> 0", getattr(t, key))
    _require(t.k_aux is None or t.k_aux >= 1, where, "training.k_aux", ">= 1 or null", t.k_aux)
    _require(0 <= t.batchtopk_threshold_beta < 1, where, "training.batchtopk_threshold_beta", "in [0, 1)",
             t.batchtopk_threshold_beta)
    dc, an = cfg.decomposition, cfg.analysis
    eval_rows = h.eval_contexts * (h.context_size - h.min_pos)
    _require(1 <= dc.fit_tokens < eval_rows, where, "decomposition.fit_tokens",
             f"between 1 and the eval rows - 1 ({eval_rows - 1} = eval_contexts x (context_size - min_pos) - 1)",
             dc.fit_tokens)
    _require(dc.ridge >= 0, where, "decomposition.ridge", ">= 0", dc.ridge)
    for i, name in enumerate(an.names):
        _require(re.fullmatch(r"[a-z_][a-z0-9_]*", name) is not None, where, f"analysis.names[{i}]",
                 "a module name in analyses/", name)
    _require(an.bootstrap >= 0, where, "analysis.bootstrap", ">= 0", an.bootstrap)
    ds = cfg.downstream
    # as for pursuit.contexts: more than the eval split has means all of them
    _require(ds.contexts >= 1, where, "downstream.contexts", ">= 1", ds.contexts)
    _require(ds.batch_contexts >= 1, where, "downstream.batch_contexts", ">= 1", ds.batch_contexts)
    gp = cfg.pursuit
    # more contexts than the eval split has means all of them (an experiment with a small eval split keeps the default)
    _require(gp.contexts is None or gp.contexts >= 1, where, "pursuit.contexts", "null or >= 1", gp.contexts)
    _require(gp.l0_multiple >= 1, where, "pursuit.l0_multiple", ">= 1", gp.l0_multiple)
    _require(gp.l0 is None or gp.l0 >= 0, where, "pursuit.l0", "null or >= 0", gp.l0)
    es = cfg.error_saes
    _require(es.expansion >= 1, where, "error_saes.expansion", ">= 1", es.expansion)
    _require(es.k >= 1, where, "error_saes.k", ">= 1", es.k)
    if es.base is not None:
        from darkmatter.sae.families import expand_families

        ids = [m.sae_id for m in expand_families(cfg.families, cfg.primary_hook)]
        _require(es.base in ids, where, "error_saes.base", f"null or an SAE of the families ({', '.join(ids)})",
                 es.base)
    _require(an.per_token_scaling.trace_tokens >= 1, where, "analysis.per_token_scaling.trace_tokens", ">= 1",
             an.per_token_scaling.trace_tokens)
    sv, pm = an.synthetic_validation, an.probe_mechanism
    for name, opts in (("synthetic_validation", sv), ("probe_mechanism", pm)):
        _require(opts.tokens >= 2, where, f"analysis.{name}.tokens", ">= 2", opts.tokens)
    _require(len(sv.ablate_percent) > 0 and all(0 <= p < 100 for p in sv.ablate_percent), where,
             "analysis.synthetic_validation.ablate_percent", "a non-empty list of percentages in [0, 100)",
             sv.ablate_percent)
    _require(len(sv.noise_levels) > 1 and all(v >= 0 for v in sv.noise_levels), where,
             "analysis.synthetic_validation.noise_levels", "at least two levels >= 0", sv.noise_levels)
    _require(sv.noise_step > 0, where, "analysis.synthetic_validation.noise_step", "> 0", sv.noise_step)
    _require(pm.min_fires >= 1, where, "analysis.probe_mechanism.min_fires", ">= 1", pm.min_fires)
    ec = an.error_component_saes
    for key in ("latents", "min_fires", "top", "explanation_size"):
        _require(getattr(ec, key) >= 1, where, f"analysis.error_component_saes.{key}", ">= 1", getattr(ec, key))
    _require(ec.examples >= 0, where, "analysis.error_component_saes.examples", ">= 0", ec.examples)
    jd = ec.judge
    _require(jd.endpoint is None or re.match(r"https?://", jd.endpoint) is not None, where,
             "analysis.error_component_saes.judge.endpoint", "null or an http(s):// URL", jd.endpoint)
    _require(jd.endpoint is None or bool(jd.model), where, "analysis.error_component_saes.judge.model",
             "the model name the endpoint serves (with judge.endpoint)", jd.model)
    for key in ("latents", "window", "explain", "per_decile"):
        _require(getattr(jd, key) >= 1, where, f"analysis.error_component_saes.judge.{key}", ">= 1",
                 getattr(jd, key))
    _require(jd.silent >= 0 and jd.timeout_s > 0, where, "analysis.error_component_saes.judge.silent/timeout_s",
             "silent >= 0 and timeout_s > 0", (jd.silent, jd.timeout_s))
    _require(an.scaling_decomposition.flat_margin_pct > 0, where, "analysis.scaling_decomposition.flat_margin_pct",
             "> 0", an.scaling_decomposition.flat_margin_pct)
    _require(an.training_budget.reference_tokens >= 1, where, "analysis.training_budget.reference_tokens", ">= 1",
             an.training_budget.reference_tokens)
    _require(an.budget_study is None or NAME_RE.fullmatch(an.budget_study) is not None, where,
             "analysis.budget_study", "null or an experiment name", an.budget_study)
    _require(0 < an.confidence < 1, where, "analysis.confidence", "strictly between 0 and 1", an.confidence)
    names = [f.name for f in cfg.families]
    _require(len(set(names)) == len(names), where, "families", "families with distinct names", names)
    _require(cfg.share_data_from is None or (NAME_RE.fullmatch(cfg.share_data_from) is not None
                                             and cfg.share_data_from != cfg.name), where, "share_data_from",
             "null or the name of another experiment (results/<name>/)", cfg.share_data_from)
    from darkmatter.sae.architectures import (
        ARCHITECTURES,  # the registry (imports torch: only when validating)
    )

    for i, fam in enumerate(cfg.families):
        p = f"families[{i}]"
        _require(NAME_RE.fullmatch(fam.name) is not None, where, f"{p}.name",  # it names figure files
                 "letters, digits, '_', '-' or '.', not starting with '.'", fam.name)
        _require(fam.architecture in ARCHITECTURES, where, f"{p}.architecture", f"one of {', '.join(ARCHITECTURES)}",
                 fam.architecture)
        _require(fam.hook is None or fam.hook in h.hooks, where, f"{p}.hook", "one of harvest.hooks", fam.hook)
        _require(len(fam.widths) > 0 and all(w >= 1 for w in fam.widths), where, f"{p}.widths",
                 "a non-empty list of integers >= 1", fam.widths)
        _require(len(fam.ks) > 0 and all(k >= 1 for k in fam.ks), where, f"{p}.ks",
                 "a non-empty list of integers >= 1", fam.ks)
        # TopK selection is not invariant to per-latent decoder norms, so they cannot be folded at save time
        _require(t.normalize_decoder or not ARCHITECTURES[fam.architecture].selects_top_k or bool(fam.source),
                 where, "training.normalize_decoder", f"true while family {fam.name!r} is {fam.architecture}",
                 t.normalize_decoder)
        for w in fam.widths:
            for k in fam.ks:
                _require(k <= w, where, f"{p}.ks", f"values <= every width (k={k} > width {w})", fam.ks)
        _require(fam.tokens is None or (fam.tokens >= t.batch_size and not fam.source), where, f"{p}.tokens",
                 f"null, or at least training.batch_size ({t.batch_size}) token-steps for a trained family",
                 fam.tokens)
    from darkmatter.sae.families import expand_families
    from darkmatter.sae.formats import SaeFormatError

    try:  # imported SAEs are described from their files here, so a bad source fails at load
        members = expand_families(cfg.families, cfg.primary_hook)
    except (SaeFormatError, ValueError) as e:
        raise ConfigError(f"{where}: families: {e}") from None
    hooks_of: dict[str, set[str]] = {}
    for m in members:
        hooks_of.setdefault(m.sae_id, set()).add(m.hook)
    shared = {sid: sorted(hooks) for sid, hooks in hooks_of.items() if len(hooks) > 1}
    # the store, the reports and the analyses name an SAE by its sae_id alone
    _require(not shared, where, "families", "SAEs on different hooks to differ in width, k or seed (an sae_id "
             "names one SAE)", shared)
    return cfg


def load_config(path: str | Path | None = None, data: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML file (or an already-parsed mapping, e.g. Snakemake's ``config``)."""
    where = str(path) if path is not None else "config"
    if data is None:
        if path is None:
            raise ConfigError("load_config needs a path or a mapping.")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such configuration file.")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of configuration keys at the top level.")
    return validate(from_dict(ExperimentConfig, data, where), where)
