"""Detection scoring of a latent's explanation (Paulo et al., "Automatically interpreting millions of features in
large language models"; the protocol the paper scored its error SAEs with).

A judge first *explains* a latent from windows of text around its top activations (on fit documents), then, given
only that explanation, *detects* which of a shuffled set of held-out windows make the latent fire: windows sampled
from each decile of its activations and windows where it never fires. The score is the judge's accuracy per decile
and on the non-firing windows. Any :class:`Judge` plugs in: an LLM behind an OpenAI-compatible endpoint
(darkmatter.analysis.judge) or the offline token-identity proxy (darkmatter.analysis.interpretability).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Example:
    """A window of text: its decoded tokens and the latent's activation on each (0 where it is silent)."""

    tokens: tuple[str, ...]
    activations: tuple[float, ...]

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)


class Judge(Protocol):
    """Explains a latent from examples, then says for each window whether the latent fires in it."""

    name: str

    def explain(self, examples: Sequence[Example]) -> str: ...

    def detect(self, explanation: str, examples: Sequence[Example]) -> list[bool]: ...
