"""longgen.eval.stats against published and hand-computed values."""

import math

import pytest

from longgen.eval.stats import mcnemar_exact, paired_difference, wilson_interval


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
