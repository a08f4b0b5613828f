"""Detection scoring of a latent's explanation (Paulo et al., "Automatically interpreting millions of features in
large language models"; the protocol the paper scored its error SAEs with).

A judge first *explains* a latent from windows of text around its top activations (on fit documents), then, given
only that explanation, *detects* which of a shuffled set of held-out windows make the latent fire: windows sampled
from each decile of its activations and windows where it never fires. The score is the judge's accuracy per decile
and on the non-firing windows. Any :class:`Judge` plugs in: an LLM behind an OpenAI-compatible endpoint
(darkmatter.analysis.judge) or the offline token-identity proxy (darkmatter.analysis.interpretability).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


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


@dataclass(frozen=True)
class TokenWindows:
    """The eval rows' token strings ``text`` [N] and contexts ``context`` [N] (rows of a context contiguous, in
    position order): windows of text ending at a row, never crossing into another context."""

    text: np.ndarray
    context: np.ndarray

    @functools.cached_property
    def first(self) -> np.ndarray:
        """Each row's context's first row."""
        starts = np.r_[True, self.context[1:] != self.context[:-1]]
        return np.maximum.accumulate(np.where(starts, np.arange(len(starts)), 0))

    def window(self, row: int, size: int, activations: np.ndarray) -> Example:
        """The ``size`` tokens ending at ``row`` (fewer at a context's start), with ``activations`` [N] on each."""
        start = max(row - size + 1, int(self.first[row]))
        return Example(tuple(str(t) for t in self.text[start:row + 1]),
                       tuple(float(a) for a in activations[start:row + 1]))

    def silent_ends(self, activations: np.ndarray, size: int) -> np.ndarray:
        """Rows whose window holds no firing at all (a moving sum of fires over the window, within its context)."""
        fires = np.r_[0, np.cumsum(activations > 0)]
        rows = np.arange(len(activations))
        start = np.maximum(rows - size + 1, self.first)
        return fires[rows + 1] - fires[start] == 0


@dataclass(frozen=True)
class DetectionSet:
    """One latent's examples: ``explain`` (windows ending at its top activations on fit rows) and ``tests``
    ((decile, window) pairs on held-out rows; decile 1 … 10 = the window ends at an activation of that decile of the
    latent's held-out activations, 0 = it never fires in the window), in a seeded random order."""

    latent: int
    explain: tuple[Example, ...]
    tests: tuple[tuple[int, Example], ...]


def detection_set(latent: int, activations: np.ndarray, fit: np.ndarray, windows: TokenWindows, *, size: int,
                  n_explain: int, per_decile: int, n_silent: int, rng: np.random.Generator) -> DetectionSet:
    """Sample a :class:`DetectionSet` from the latent's dense ``activations`` [N] over the eval rows (``fit``: the
    rows explanations may be drawn from; tests come from the others)."""
    from darkmatter.analysis.interpretability import DECILES, decile_of

    firing = activations > 0
    fit_rows = np.flatnonzero(firing & fit)
    top = fit_rows[np.argsort(-activations[fit_rows], kind="stable")[:n_explain]]
    held = np.flatnonzero(firing & ~fit)
    decile = decile_of(activations[held])
    tests: list[tuple[int, Example]] = []
    for q in range(1, DECILES + 1):
        rows = held[decile == q]
        for row in rng.choice(rows, min(per_decile, len(rows)), replace=False):
            tests.append((q, windows.window(int(row), size, activations)))
    silent = np.flatnonzero(windows.silent_ends(activations, size) & ~fit)
    for row in rng.choice(silent, min(n_silent, len(silent)), replace=False):
        tests.append((0, windows.window(int(row), size, activations)))
    order = rng.permutation(len(tests))
    return DetectionSet(latent, tuple(windows.window(int(r), size, activations) for r in top),
                        tuple(tests[i] for i in order))


@dataclass(frozen=True)
class Detection:
    """A judge's verdicts on one :class:`DetectionSet`: its ``explanation``, and per test window its decile and
    whether the judge said the latent fires there (``said``); ``correct`` = said == (decile > 0)."""

    latent: int
    explanation: str
    deciles: tuple[int, ...]
    said: tuple[bool, ...]

    @property
    def correct(self) -> np.ndarray:
        return np.array(self.said) == (np.array(self.deciles) > 0)


def detect(judge: Judge, examples: DetectionSet) -> Detection:
    """Explain the latent from its top windows, then ask the judge about every test window (detection scoring)."""
    explanation = judge.explain(examples.explain)
    said = judge.detect(explanation, [e for _, e in examples.tests])
    return Detection(examples.latent, explanation, tuple(q for q, _ in examples.tests), tuple(bool(s) for s in said))
