"""Statistics for accuracy comparisons: Wilson intervals, and paired differences on the same prompts.

Two models answering the same prompts are compared through their discordant pairs (one right, the other wrong):
`paired_difference` gives the difference of accuracies with Newcombe's interval for paired proportions (method
10 of Newcombe, *Statistics in Medicine* 17:2635, 1998: Wilson intervals of both accuracies combined through the
phi correlation of the pairs), which stays sensible at 0 or 100% and with few discordant pairs, and McNemar's
exact two-sided p-value. `bootstrap_interval` is for statistics of several models on the same prompts that have no
closed-form interval (e.g. a difference averaged over training runs): prompts are resampled, the same resample for
every model. `mean_interval` treats a few independent values as the sample (e.g. one difference per training run):
the Student-t interval of their mean, so it covers how much the values move from one to the next, whatever moves them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion `correct` / `n` (95% by default)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(correct, bool) or not isinstance(correct, int) or not 0 <= correct <= n:
        raise ValueError(f"correct must be an int in [0, n={n}], got {correct!r}")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # contains p despite rounding


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of A minus accuracy of B on the same `n` prompts, its 95% interval and McNemar's p-value.

    `a_only` / `b_only`: prompts that only A / only B answered correctly (the discordant pairs)."""

    n: int
    both: int
    a_only: int
    b_only: int
    neither: int
    diff: float
    ci_low: float
    ci_high: float
    p_value: float


def paired_difference(a: Sequence[bool], b: Sequence[bool], z: float = Z95) -> PairedDifference:
    """Compare two models' correctness on the same prompts (``a[i]`` and ``b[i]`` answer prompt i)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired results need the same, non-zero number of prompts; got {len(a)} and {len(b)}")
    n = len(a)
    both = sum(1 for x, y in zip(a, b, strict=True) if x and y)
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    neither = n - both - a_only - b_only
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    l1, u1 = wilson_interval(both + a_only, n, z)
    l2, u2 = wilson_interval(both + b_only, n, z)
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    phi = (both * neither - a_only * b_only) / math.sqrt(margins) if margins else 0.0
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    diff = p1 - p2
    return PairedDifference(
        n, both, a_only, b_only, neither, diff, max(-1.0, diff - lower), min(1.0, diff + upper),
        mcnemar_exact(a_only, b_only),
    )  # fmt: skip


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: the binomial(a_only + b_only, 1/2) probability of a split at least as
    uneven as the one observed (1.0 when there are no discordant pairs)."""
    m = a_only + b_only
    if m == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return min(1.0, 2 * tail)


def bootstrap_interval(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
    strata: Sequence[object] | np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of `n` prompts: `statistic` gets a ``(resamples, n)`` array of
    prompt indices, each row drawn with replacement (seeded), and returns the statistic of each row; the interval is
    the central `level` share of those values. With `strata` (a label per prompt) each row is drawn within each
    label's prompts: position i of a row holds one of the prompts labelled as prompt i is, so every row keeps each
    stratum's size (a statistic computed within groups never meets an empty one)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples must be an int >= 100, got {resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    rng = np.random.default_rng(seed)
    if strata is None:
        rows = rng.integers(0, n, size=(resamples, n))
    else:
        labels = np.asarray(strata)
        if labels.shape != (n,):
            raise ValueError(f"strata must give one label per prompt, {n} in all; got shape {labels.shape}")
        rows = np.empty((resamples, n), dtype=np.int64)
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            rows[:, members] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
    values = np.asarray(statistic(rows), dtype=np.float64)
    if values.shape != (resamples,):
        raise ValueError(f"statistic must return one value per resample, shape ({resamples},); got {values.shape}")
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def t_quantile(level: float, df: int) -> float:
    """The two-sided `level` quantile of Student's t with `df` degrees of freedom: the t with P(|T| <= t) = level.

    P(|T| <= t) has a closed form for integer `df` (Abramowitz and Stegun 26.7.3 and 26.7.4, with theta =
    atan(t / sqrt(df))); it rises with t, so t is found by bisection to double precision."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive int, got {df!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")

    def inside(t: float) -> float:
        theta = math.atan(t / math.sqrt(df))
        c2 = math.cos(theta) ** 2
        if df % 2:  # odd: (2 / pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), (df - 1) / 2 terms
            term, series = 1.0, 0.0
            for k in range(1, (df - 1) // 2 + 1):
                series += term
                term *= c2 * 2 * k / (2 * k + 1)
            return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
        term, series = 1.0, 0.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df / 2 terms
        for k in range(1, df // 2 + 1):
            series += term
            term *= c2 * (2 * k - 1) / (2 * k)
        return math.sin(theta) * series

    low, high = 0.0, 1.0
    while inside(high) < level:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if mid in (low, high):
            break
        low, high = (mid, high) if inside(mid) < level else (low, mid)
    return (low + high) / 2


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """The mean of a few independent `values` (at least 2), with its Student-t interval: mean +- t(level, k - 1) *
    sd / sqrt(k), sd the sample standard deviation of the k values. Returns (mean, low, high)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2 or not np.isfinite(x).all():
        raise ValueError(f"values must be at least 2 finite numbers, got {list(values)!r}")
    mean = float(x.mean())
    half = t_quantile(level, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half
