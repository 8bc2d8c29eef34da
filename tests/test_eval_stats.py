"""longgen.eval.stats against published and hand-computed values."""

import math

import numpy as np
import pytest

from longgen.eval.stats import (
    bootstrap_interval,
    mcnemar_exact,
    mean_interval,
    paired_difference,
    t_quantile,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [
        (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Statistics in Medicine 17:857, Table I
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_published_values(correct, n, low, high):
    lo, hi = wilson_interval(correct, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half 1.96 * sqrt(0.016 + 0.009604) / 1.38416
    z = 1.96
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    lo, hi = wilson_interval(8, 10, z=z)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=5e-5)


def test_wilson_interval_contains_the_estimate_at_the_edges():
    for n in (1, 3, 40, 200):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0


def test_paired_difference_matches_newcombe_method_10():
    # Newcombe (1998), Statistics in Medicine 17:2635, Table II, example (a): both 36, only A 12, only B 2, neither 0
    a = [True] * 36 + [True] * 12 + [False] * 2
    b = [True] * 36 + [False] * 12 + [True] * 2
    d = paired_difference(a, b)
    assert (d.n, d.both, d.a_only, d.b_only, d.neither) == (50, 36, 12, 2, 0)
    assert d.diff == pytest.approx(0.2)
    assert d.ci_low == pytest.approx(0.0569, abs=5e-5) and d.ci_high == pytest.approx(0.3404, abs=5e-5)


def test_paired_difference_is_antisymmetric_and_zero_for_identical_results():
    a = [True, False, True, True, False, True, True, True]
    b = [True, True, False, True, False, False, True, True]
    ab, ba = paired_difference(a, b), paired_difference(b, a)
    assert ab.diff == pytest.approx(-ba.diff)
    assert ab.ci_low == pytest.approx(-ba.ci_high) and ab.ci_high == pytest.approx(-ba.ci_low)
    same = paired_difference(a, a)
    assert same.diff == 0 and same.ci_low < 0 < same.ci_high and same.p_value == 1.0


def test_mcnemar_exact_by_hand():
    # 1 vs 9 discordant: 2 * (C(10,0) + C(10,1)) / 2**10
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="n must be a positive int"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r"correct must be an int in \[0, n=5\]"):
        wilson_interval(6, 5)
    with pytest.raises(ValueError, match="same, non-zero number of prompts"):
        paired_difference([True], [True, False])


def test_bootstrap_interval_of_a_mean_matches_the_normal_interval():
    """400 prompts, 300 right: the bootstrap interval of the accuracy is close to the normal one (0.75 ± 0.0424);
    a constant statistic has no width; the same seed gives the same interval, another seed another."""
    hits = np.array([1] * 300 + [0] * 100, dtype=float)
    low, high = bootstrap_interval(lambda rows: hits[rows].mean(axis=1), 400)
    half = 1.959963984540054 * math.sqrt(0.75 * 0.25 / 400)
    assert low == pytest.approx(0.75 - half, abs=0.005) and high == pytest.approx(0.75 + half, abs=0.005)
    assert bootstrap_interval(lambda rows: hits[rows].mean(axis=1), 400) == (low, high)
    assert bootstrap_interval(lambda rows: hits[rows].mean(axis=1), 400, seed=1) != (low, high)
    assert bootstrap_interval(lambda rows: np.full(len(rows), 0.25), 400) == (0.25, 0.25)
    # a paired difference resampled by prompt: close to Newcombe's interval on the same pairs
    a = np.array([1] * 350 + [0] * 50, dtype=float)
    b = np.array([1] * 330 + [0] * 20 + [1] * 10 + [0] * 40, dtype=float)
    d = paired_difference(a.astype(bool).tolist(), b.astype(bool).tolist())
    low, high = bootstrap_interval(lambda rows: a[rows].mean(axis=1) - b[rows].mean(axis=1), 400)
    assert low == pytest.approx(d.ci_low, abs=0.006) and high == pytest.approx(d.ci_high, abs=0.006)


def test_bootstrap_interval_within_strata_keeps_each_groups_size():
    """With strata every resampled prompt comes from its own position's group, so a difference between two groups of
    fixed size (200 prompts 75% right, 100 prompts 50% right) gets the normal interval of two independent proportions
    (0.25 ± 1.96 * sqrt(0.75 * 0.25 / 200 + 0.5 * 0.5 / 100) = 0.25 ± 0.1149); no strata draws across the groups."""
    hits = np.array([1] * 150 + [0] * 50 + [1] * 50 + [0] * 50, dtype=float)
    group = np.array(["a"] * 200 + ["b"] * 100)
    seen = []

    def gap(rows: np.ndarray) -> np.ndarray:
        seen.append(rows)
        return hits[rows[:, :200]].mean(axis=1) - hits[rows[:, 200:]].mean(axis=1)

    low, high = bootstrap_interval(gap, 300, strata=group)
    half = 1.959963984540054 * math.sqrt(0.75 * 0.25 / 200 + 0.5 * 0.5 / 100)
    assert low == pytest.approx(0.25 - half, abs=0.006) and high == pytest.approx(0.25 + half, abs=0.006)
    assert (seen[0][:, :200] < 200).all() and (seen[0][:, 200:] >= 200).all()
    bootstrap_interval(gap, 300)
    assert (seen[1][:, :200] >= 200).any()  # without strata the groups mix
    with pytest.raises(ValueError, match=r"strata must give one label per prompt, 300 in all; got shape \(299,\)"):
        bootstrap_interval(gap, 300, strata=group[:299])


def test_bootstrap_interval_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        bootstrap_interval(lambda rows: rows.mean(axis=1), 0)
    with pytest.raises(ValueError, match="resamples must be an int >= 100, got 10"):
        bootstrap_interval(lambda rows: rows.mean(axis=1), 5, resamples=10)
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\), got 1.5"):
        bootstrap_interval(lambda rows: rows.mean(axis=1), 5, level=1.5)
    with pytest.raises(ValueError, match=r"one value per resample, shape \(100,\); got \(100, 5\)"):
        bootstrap_interval(lambda rows: rows, 5, resamples=100)


@pytest.mark.parametrize(
    ("level", "df", "t"),
    [  # published two-sided quantiles of Student's t (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2)
        (0.95, 1, 12.706),
        (0.95, 2, 4.303),
        (0.95, 3, 3.182),
        (0.95, 4, 2.776),
        (0.95, 10, 2.228),
        (0.95, 30, 2.042),
        (0.99, 7, 3.499),
        (0.90, 5, 2.015),
    ],
)
def test_t_quantile_matches_published_values(level, df, t):
    assert t_quantile(level, df) == pytest.approx(t, abs=5e-4)


def test_t_quantile_by_hand_and_towards_the_normal():
    # df = 1 is Cauchy: P(|T| <= t) = 2 atan(t) / pi, so the 95% point is tan(0.475 pi)
    # df = 2: P(|T| <= t) = t / sqrt(2 + t^2), so t = sqrt(2 / (1 / p^2 - 1))
    assert t_quantile(0.95, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    assert t_quantile(0.8, 2) == pytest.approx(math.sqrt(2 / (1 / 0.8**2 - 1)), rel=1e-12)
    assert t_quantile(0.5, 1) == pytest.approx(1.0, rel=1e-12)
    values = [t_quantile(0.95, df) for df in (1, 2, 5, 20, 200)]
    assert values == sorted(values, reverse=True) and values[-1] == pytest.approx(1.972, abs=5e-4)


def test_mean_interval_by_hand():
    # -3.2, -3.2, -8.2: mean -4.8667, sd sqrt(8.3333) = 2.8868, half 4.3027 * 2.8868 / sqrt(3) = 7.171
    mean, low, high = mean_interval([-3.2, -3.2, -8.2])
    assert mean == pytest.approx(-4.8667, abs=1e-4)
    assert (low, high) == pytest.approx((-12.0378, 2.3044), abs=1e-4)
    assert mean_interval([1.0, 1.0]) == (1.0, 1.0, 1.0)  # no spread, no width
    mean, low, high = mean_interval([0.0, 2.0], level=0.5)  # sd sqrt(2), t(0.5, 1) = 1: half sqrt(2) / sqrt(2) = 1
    assert (mean, low, high) == pytest.approx((1.0, 0.0, 2.0))


def test_t_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="df must be a positive int"):
        t_quantile(0.95, 0)
    with pytest.raises(ValueError, match="df must be a positive int"):
        t_quantile(0.95, 2.0)
    with pytest.raises(ValueError, match="level must lie in"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="at least 2 finite numbers"):
        mean_interval([1.0])
    with pytest.raises(ValueError, match="at least 2 finite numbers"):
        mean_interval([1.0, float("nan")])
