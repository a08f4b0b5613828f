"""Whether a measurement agrees with the paper's claim: one word and the numbers behind it.

Each analysis that tests a claim defines ``verdict(summary, table) -> Verdict``; the runner stores the word and
its basis in the summary (``verdict``, ``verdict_basis``) and the report's top table shows them beside the claim.
The word is decided from intervals (resampled by document) against a stated margin wherever the analysis has
them: *agrees* when the interval lies on the claim's side, *differs* when it lies on the other side, and
*undetermined* when it straddles the boundary or the measurement is missing. A claim's boundary (what "about
half" or "roughly flat" means in numbers) is written into the basis, so a reader can disagree with it.
Whether a difference survives more SAE training is a separate question, answered by a training-budget study
(analyses/training_budget.py, config/budget.yaml); the report adds its word (robust / moves with budget) beside
each verdict it tested.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Word = Literal["agrees", "differs", "undetermined"]
WORDS: tuple[Word, ...] = ("agrees", "differs", "undetermined")


@dataclass(frozen=True)
class Verdict:
    word: Word
    basis: str

    def __post_init__(self) -> None:
        if self.word not in WORDS:
            raise ValueError(f"verdict {self.word!r} is not one of {', '.join(WORDS)}.")

    def as_summary(self) -> dict[str, str]:
        return {"verdict": self.word, "verdict_basis": self.basis}


def by_interval(low: float, high: float, boundary: float, claim_above: bool) -> Word:
    """The word for an interval [low, high] against a claim "the value is above ``boundary``" (or below, when
    ``claim_above`` is False); undetermined when the interval contains the boundary or is not a number."""
    if any(math.isnan(v) for v in (low, high)):
        return "undetermined"
    if low > boundary:
        return "agrees" if claim_above else "differs"
    if high < boundary:
        return "differs" if claim_above else "agrees"
    return "undetermined"


def by_majority(words: Sequence[Word]) -> Word:
    """One word for a claim about most SAEs: the word of more than half of them, else undetermined."""
    for word in ("agrees", "differs"):
        if sum(w == word for w in words) * 2 > len(words):
            return word
    return "undetermined"


def interval(value: float, low: float, high: float, digits: int = 3) -> str:
    """``0.518 [0.467, 0.578]``."""
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def most_above(lows: Sequence[float], highs: Sequence[float], boundary: float, what: str) -> Verdict:
    """A claim "``what`` is above ``boundary`` for most SAEs", from each SAE's interval."""
    words = [by_interval(lo, hi, boundary, claim_above=True) for lo, hi in zip(lows, highs, strict=True)]
    return Verdict(by_majority(words), f"{what} above {boundary:g} (whole interval) in {words.count('agrees')} of "
                                       f"{len(words)} SAEs, below it in {words.count('differs')}")


def most_above_in(table: Any, column: str, boundary: float, what: str) -> Verdict:
    """:func:`most_above` over the rows' intervals ``<column>_low`` .. ``<column>_high`` of a table; undetermined
    when the table has none (an analysis run without its bootstrap)."""
    if f"{column}_low" not in table.columns:
        return Verdict("undetermined", f"{what}: no intervals (the bootstrap was off)")
    return most_above(table[f"{column}_low"].to_list(), table[f"{column}_high"].to_list(), boundary, what)


def from_answer(answer: object, basis: str) -> Verdict:
    """The word for an analysis's own yes/no answer to the claim ("yes…" agrees, "no…" differs)."""
    m = re.match(r"(yes|no)\b", str(answer).lower())  # "not measured" is neither
    word: Word = "undetermined" if m is None else "agrees" if m.group(1) == "yes" else "differs"
    return Verdict(word, basis)
