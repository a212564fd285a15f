"""Paired bootstrap and Holm's correction on constructed cases whose answer is known."""

import math

import numpy as np
import pytest

from lowrank.stats import holm, paired_bootstrap


def bernoulli(rng, n, p):
    return (rng.random(n) < p).astype(float)


def test_identical_predictions_give_zero_difference_and_p_one():
    a = bernoulli(np.random.default_rng(0), (3, 500), 0.8)
    res = paired_bootstrap(a, a.copy(), n_boot=2000)
    assert res.diff == 0 and res.low <= 0 <= res.high
    assert res.p == 1.0 and not res.significant()


def test_a_planted_five_point_gap_on_2000_examples_is_significant():
    rng = np.random.default_rng(1)
    b = bernoulli(rng, 2000, 0.80)
    a = b.copy()
    a[rng.choice(np.flatnonzero(b == 0), 100, replace=False)] = 1  # 100 more right: +5 points
    res = paired_bootstrap(a, b, n_boot=5000)
    assert res.diff == pytest.approx(0.05, abs=1e-12)
    assert res.low > 0 and res.low < 0.05 < res.high
    # a − b is 1 on 100 examples and 0 elsewhere: no replicate comes near 0, so only the +1 of
    # the estimator is left: p = 1/(1 + n_boot)
    assert res.p == pytest.approx(1 / 5001) and res.significant()


def test_interval_width_matches_the_normal_theory_standard_error():
    rng = np.random.default_rng(2)
    a, b = bernoulli(rng, 1500, 0.75), bernoulli(rng, 1500, 0.72)
    res = paired_bootstrap(a, b, n_boot=20_000, level=0.95)
    d = a - b
    se = d.std() / math.sqrt(len(d))  # the bootstrap's own variance is exactly var(d)/n
    # the mean of 1500 bounded terms is close to normal; the 2.5 % / 97.5 % quantiles of 20 000
    # replicates carry a Monte-Carlo error of about 1 % of the width: 4 % is a safe margin
    assert (res.high - res.low) / (2 * 1.959964 * se) == pytest.approx(1.0, rel=0.04)


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    covered = 0
    trials = 300
    for t in range(trials):
        # paired: b is a with every right answer lost with probability 0.05 and every wrong
        # one gained with probability 0.02 → true difference 0.8·0.05 − 0.2·0.02 = 0.036
        a = bernoulli(rng, 1000, 0.8)
        u = rng.random(1000)
        b = np.where(a == 1, (u >= 0.05), (u < 0.02)).astype(float)
        res = paired_bootstrap(a, b, n_boot=1000, seed=t)
        covered += res.low <= 0.036 <= res.high
    # binomial sd of the coverage at 0.95 over 300 trials is 0.0126: ±3.2 sd is [0.91, 0.99]
    # (at 400 examples, ~20 discordant pairs, the percentile interval runs narrow: 0.91)
    assert 0.91 <= covered / trials <= 0.99


def test_shared_examples_resample_one_index_set_for_every_seed():
    rng = np.random.default_rng(4)
    row_a, row_b = bernoulli(rng, 800, 0.7), bernoulli(rng, 800, 0.65)
    a, b = np.stack([row_a] * 3), np.stack([row_b] * 3)  # three seeds that agree exactly
    one = paired_bootstrap(row_a, row_b, n_boot=4000, seed=5)
    shared = paired_bootstrap(a, b, n_boot=4000, seed=5)
    indep = paired_bootstrap(a, b, n_boot=4000, seed=5, shared_examples=False)
    width = lambda r: r.high - r.low  # noqa: E731
    # the same draws on identical rows: exactly the one-seed replicates
    assert (shared.low, shared.high) == (one.low, one.high)
    # treating the rows as independent samples shrinks the width by √3 (±5 % Monte Carlo)
    assert width(shared) / width(indep) == pytest.approx(math.sqrt(3), rel=0.05)


def test_holm_on_a_hand_computed_family_and_against_its_definition():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → running max
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(6)
    q = rng.random(12) ** 3
    s = np.sort(q)
    m = len(q)
    brute = [min(1.0, max((m - j) * s[j] for j in range(i + 1))) for i in range(m)]
    np.testing.assert_allclose(np.sort(holm(q)), brute)
    assert (holm(q) >= q).all()
    assert holm([0.5])[0] == 0.5 and holm([0.9, 0.9])[0] == 1.0


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "message"),
    [
        ([1, 0, 1], [1, 0], {}, "paired"),
        ([1, 0], [1, np.nan], {}, "NaN"),
        ([], [], {}, "shape"),
        ([1, 0], [0, 1], {"n_boot": 10}, "n_boot"),
        ([1, 0], [0, 1], {"level": 95}, "level"),
    ],
)
def test_bad_input_is_one_sentence(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(a, b, **kwargs)


def test_holm_refuses_values_that_are_not_p_values():
    with pytest.raises(ValueError, match="p-values"):
        holm([0.2, 1.5])
