"""The verdict vocabulary: interval against a boundary, majority over SAEs, yes/no answers."""

from __future__ import annotations

import math

import pytest

from darkmatter.analysis.verdict import Verdict, by_interval, by_majority, from_answer, most_above


@pytest.mark.parametrize(("low", "high", "above", "word"), [
    (0.91, 0.95, True, "agrees"), (0.80, 0.85, True, "differs"), (0.85, 0.92, True, "undetermined"),
    (0.80, 0.85, False, "agrees"), (0.91, 0.95, False, "differs"), (math.nan, 0.95, True, "undetermined"),
])
def test_an_interval_decides_only_when_it_excludes_the_boundary(low, high, above, word):
    assert by_interval(low, high, 0.9, claim_above=above) == word


def test_most_saes_decide_and_a_tie_is_undetermined():
    assert by_majority(["agrees", "agrees", "differs"]) == "agrees"
    assert by_majority(["differs", "undetermined", "differs"]) == "differs"
    assert by_majority(["agrees", "differs"]) == "undetermined"
    assert by_majority(["agrees", "undetermined", "undetermined"]) == "undetermined"
    assert by_majority([]) == "undetermined"


def test_most_above_counts_each_side_in_its_basis():
    v = most_above([0.8, 0.92, 0.7], [0.85, 0.95, 0.95], 0.9, "R²")
    assert v == Verdict("undetermined", "R² above 0.9 (whole interval) in 1 of 3 SAEs, below it in 1")
    assert most_above([0.8, 0.7], [0.85, 0.88], 0.9, "R²").word == "differs"


def test_answers_map_to_words_and_not_measured_is_undetermined():
    assert from_answer("yes", "b").word == "agrees"
    assert from_answer("no (falls with width)", "b").word == "differs"
    assert from_answer("not measured", "b").word == "undetermined"
    assert from_answer(math.nan, "b").word == "undetermined"
    with pytest.raises(ValueError, match="is not one of agrees, differs, undetermined"):
        Verdict("maybe", "b")
