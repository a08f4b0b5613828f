"""What the SAE error costs downstream: splice replacements into the model at a hook and measure CE and KL."""

from darkmatter.downstream.ce import SplicedSae, measure_ce, summarize_ce
from darkmatter.downstream.splice import (
    SpliceLosses,
    ce_loss_score,
    mean_ablation,
    percent_recovered,
    splice_losses,
    zero_ablation,
)

__all__ = ["SpliceLosses", "SplicedSae", "ce_loss_score", "mean_ablation", "measure_ce", "percent_recovered",
           "splice_losses", "summarize_ce", "zero_ablation"]
