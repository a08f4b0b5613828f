"""The offline interpretability proxy: a planted single-token latent scores a perfect AUROC, a latent that fires at
random scores chance, and the random-direction control keeps the densities it is given."""

from __future__ import annotations

import numpy as np
import pytest

from darkmatter.analysis.interpretability import LatentActivity, ProxyScorer, random_direction_latents


@pytest.fixture
def planted(rng):
    n, vocab = 40_000, 50
    token_ids = rng.integers(0, vocab, n)
    documents = np.arange(n) // 200
    fit = documents % 2 == 0  # whole documents on each side
    acts = np.zeros((n, 3), dtype=np.float32)
    acts[token_ids == 7, 0] = rng.uniform(0.5, 2.0, (token_ids == 7).sum())  # fires exactly on token 7
    random_rows = rng.random(n) < 0.05
    acts[random_rows, 1] = rng.uniform(0.5, 2.0, random_rows.sum())  # fires at random
    return token_ids, fit, acts


def test_a_single_token_latent_is_detected_perfectly_and_a_random_one_at_chance(planted):
    token_ids, fit, acts = planted
    scorer = ProxyScorer(token_ids, fit)
    for activity in (LatentActivity.from_dense(acts), _as_codes(acts)):
        token7, noise, silent = (scorer.score(activity, j) for j in range(3))
        assert token7.auroc == 1.0 and token7.explanation == (7,) and token7.top_token_entropy_bits == 0.0
        assert token7.density == pytest.approx((token_ids == 7).mean())
        # chance, within a margin ~5 standard errors of an AUROC on ~1,000 positives among 20,000 rows
        assert abs(noise.auroc - 0.5) < 0.05 and noise.top_token_entropy_bits > 4.0
        assert np.isnan(silent.auroc) and silent.explanation == ()


def _as_codes(acts: np.ndarray) -> LatentActivity:
    """The same activity given as TopK-style sparse codes [N, 2] (a zero value is padding)."""
    top = np.argsort(-acts, axis=1, kind="stable")[:, :2]
    return LatentActivity.from_codes(top, np.take_along_axis(acts, top, 1), acts.shape[1])


def test_random_direction_control_keeps_the_densities(rng):
    x = rng.normal(size=(5000, 16)).astype(np.float32) + 3
    densities = np.array([0.001, 0.01, 0.2])
    control = random_direction_latents(x, densities, seed=0)
    fired = np.diff(control.offsets)
    np.testing.assert_array_equal(fired, np.round(densities * 5000).astype(int))
    assert (control.values > 0).all()
    again = random_direction_latents(x, densities, seed=0)
    np.testing.assert_array_equal(again.rows, control.rows)


def test_the_proxy_needs_both_sides_of_the_split(planted):
    token_ids, fit, _ = planted
    with pytest.raises(ValueError, match="needs fit and held-out rows"):
        ProxyScorer(token_ids, np.ones_like(fit))


def test_auroc_against_equals_sklearn_with_ties(rng):
    from sklearn.metrics import roc_auc_score

    from darkmatter.analysis.interpretability import auroc_against

    neg, pos = rng.integers(0, 5, 300).astype(float), rng.integers(1, 7, 80).astype(float)
    want = roc_auc_score(np.r_[np.zeros(300), np.ones(80)], np.r_[neg, pos])
    assert auroc_against(np.sort(neg), pos) == pytest.approx(want, rel=1e-12)
    assert np.isnan(auroc_against(np.sort(neg), pos[:0]))


def test_deciles_split_activations_by_rank_into_equal_tenths(rng):
    from darkmatter.analysis.interpretability import decile_of

    values = rng.random(1000)
    q = decile_of(values)
    assert np.bincount(q)[1:].tolist() == [100] * 10
    assert values[q == 10].min() > values[q == 9].max() and values[q == 1].max() < values[q == 2].min()


def test_a_latent_whose_strongest_activations_track_a_token_scores_perfectly_in_its_top_decile(planted):
    """Strong activations exactly on token 7, weak ones at random elsewhere: all firings together are a blend, the
    top decile is perfect and the bottom one is at chance — what the per-decile curve is for."""
    token_ids, fit, _ = planted
    gen = np.random.default_rng(1)
    acts = np.zeros((len(token_ids), 1), dtype=np.float32)
    weak = (gen.random(len(token_ids)) < 0.15) & (token_ids != 7)  # token 7 (2% of rows) is ~12% of the firings
    acts[weak, 0] = gen.uniform(0.1, 0.5, weak.sum())
    acts[token_ids == 7, 0] = gen.uniform(5.0, 6.0, (token_ids == 7).sum())
    s = ProxyScorer(token_ids, fit).score(LatentActivity.from_dense(acts), 0)
    assert s.auroc_top_decile == 1.0 and s.explanation == (7,)
    assert abs(s.auroc_by_decile[0] - 0.5) < 0.05
    assert 0.5 < s.auroc < 0.65  # the blend: ~10% of the firings are the token
