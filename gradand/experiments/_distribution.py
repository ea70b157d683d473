"""Results as distributions over seeds: a mean with its interval, and a success rate with its own.

An experiment run over ``n`` seeds gives ``n`` values (a test accuracy each). One number
hides what matters when outcomes are chaotic, so :func:`distribution` reports:

- the **mean** and a **Student-t interval for the mean** at ``level`` (95 %):
  ``mean ± t_{(1+level)/2, n-1} · s / √n`` with ``s`` the sample standard deviation
  (``ddof=1``). It assumes the seeds' values are independent draws of one distribution and
  leans on the mean being roughly normal; with few seeds and a skewed distribution (most runs
  at 1.0, a few far below) it is only a guide, which is why the success rate comes with it.
  With one value there is no interval (``low``/``high`` are ``None``). The interval is
  not clipped to the values' range: an upper end above 1 for accuracies says the normal
  approximation is poor there, and the success rate is the better summary;
- the **success rate**: the fraction of values ``>= threshold`` (0.95), with a **Wilson score
  interval** at the same level, which stays inside [0, 1] and is sensible at 0/n and n/n
  (unlike the normal-approximation interval).

Only the standard library and numpy are used: the t quantile comes from the exact
closed-form distribution function of Student's t for an integer number of degrees of
freedom (Abramowitz & Stegun 26.7.3–4), inverted by bisection, and from a Cornish–Fisher
expansion beyond 200 degrees of freedom.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "Distribution",
    "PairedDifference",
    "distribution",
    "paired_difference",
    "t_quantile",
    "wilson_interval",
]

_CORNISH_FISHER_FROM = 200


def _check_level(level: Any) -> float:
    if (
        isinstance(level, bool)
        or not isinstance(level, (int, float, np.integer, np.floating))
        or not math.isfinite(level)
        or not 0 < level < 1
    ):
        raise ValueError(f"level must be a number in (0, 1), such as 0.95; got {level!r}")
    return float(level)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer ``df`` >= 1 (A&S 26.7.3, 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        total, term = 0.0, math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):  # cos θ · (1 + 2/3 c² + 2·4/(3·5) c⁴ + ...)
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return min(1.0, (2 / math.pi) * (theta + s * total))
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):  # 1 + 1/2 c² + 1·3/(2·4) c⁴ + ...
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return min(1.0, s * total)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` (integer) degrees of freedom.

    Accurate to about 1e-9 (exact distribution function inverted by bisection; a
    Cornish–Fisher expansion for ``df > 200``).

    Example:
        >>> from gradand.experiments._distribution import t_quantile
        >>> [round(t_quantile(0.975, df), 3) for df in (1, 9, 10**6)]
        [12.706, 2.262, 1.96]
        >>> t_quantile(0.025, 9) == -t_quantile(0.975, 9)
        True
    """
    if (
        isinstance(p, bool)
        or not isinstance(p, (int, float, np.integer, np.floating))
        or not math.isfinite(p)
        or not 0 < p < 1
    ):
        raise ValueError(f"p must be a probability in (0, 1); got {p!r}")
    df = _check_count("df", df, 1)
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    z = NormalDist().inv_cdf(p)
    if df > _CORNISH_FISHER_FROM:
        g1 = (z**3 + z) / 4
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
        g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
        return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4
    target = 2 * p - 1  # P(|T| <= t) = 2p - 1 for the upper quantile t
    low, high = z, max(2 * z, 1.0)
    while _t_two_sided(high, df) < target:
        low, high = high, 2 * high
    for _ in range(200):
        mid = (low + high) / 2
        if _t_two_sided(mid, df) < target:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2


def wilson_interval(successes: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a success rate ``successes / n`` at confidence ``level``.

    Example:
        >>> from gradand.experiments._distribution import wilson_interval
        >>> [round(v, 3) for v in wilson_interval(14, 20)]
        [0.481, 0.855]
        >>> [round(v, 3) for v in wilson_interval(20, 20)]  # never above 1, not degenerate at n/n
        [0.839, 1.0]
    """
    n = _check_count("n", n, 1)
    successes = _check_count("successes", successes, 0)
    if successes > n:
        raise ValueError(f"successes must be at most n = {n}; got {successes}")
    level = _check_level(level)
    z = NormalDist().inv_cdf((1 + level) / 2)
    rate = successes / n
    denominator = 1 + z * z / n
    center = (rate + z * z / (2 * n)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denominator
    # exact in real arithmetic: low = 0 at 0/n, high = 1 at n/n, low <= rate <= high; keep it so
    low = 0.0 if successes == 0 else min(rate, center - half)
    high = 1.0 if successes == n else max(rate, center + half)
    return max(0.0, low), min(1.0, high)


@dataclasses.dataclass(frozen=True)
class Distribution:
    """Per-seed values summarised: mean with a Student-t interval, success rate with a Wilson interval.

    Attributes:
        values: the per-seed values, in the order given.
        n: how many.
        mean: their mean.
        std: their sample standard deviation (``ddof=1``; ``None`` for one value).
        low, high: the ``level`` Student-t interval for the mean (``None`` for one value).
        threshold: a value counts as a success when ``>= threshold``.
        successes: how many values are successes.
        success_rate: ``successes / n``.
        success_low, success_high: the ``level`` Wilson interval for the success rate.
        level: the confidence level of both intervals.

    Example:
        >>> from gradand.experiments._distribution import distribution
        >>> d = distribution([0.999, 0.9525, 1.0, 0.793, 0.856])
        >>> d.format()
        '0.920 ± 0.114 (n=5), ≥0.95: 3/5 [0.23, 0.88]'
        >>> d.to_json()["success_rate"]
        0.6
    """

    values: tuple[float, ...]
    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None
    threshold: float
    successes: int
    success_rate: float
    success_low: float
    success_high: float
    level: float

    @property
    def half_width(self) -> float | None:
        """Half the width of the interval for the mean (``None`` for one value).

        Example:
            >>> from gradand.experiments._distribution import distribution
            >>> round(distribution([1.0, 2.0, 3.0]).half_width, 3)
            2.484
        """
        if self.low is None or self.high is None:
            return None
        return (self.high - self.low) / 2

    def format(self, digits: int = 3) -> str:
        """One table cell: ``mean ± half-width (n), ≥threshold: successes/n [Wilson interval]``.

        Example:
            >>> from gradand.experiments._distribution import distribution
            >>> distribution([0.97]).format()
            '0.970 (n=1), ≥0.95: 1/1 [0.21, 1.00]'
        """
        digits = _check_count("digits", digits, 0)
        spread = "" if self.half_width is None else f" ± {self.half_width:.{digits}f}"
        return (
            f"{self.mean:.{digits}f}{spread} (n={self.n}), ≥{self.threshold:g}: "
            f"{self.successes}/{self.n} [{self.success_low:.2f}, {self.success_high:.2f}]"
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (plain floats, ints, lists and ``None``; no NaN or infinity).

        Example:
            >>> import json
            >>> from gradand.experiments._distribution import distribution
            >>> d = json.loads(json.dumps(distribution([0.9]).to_json(), allow_nan=False))
            >>> d["values"], d["low"], d["interval"], d["success_interval"]
            ([0.9], None, 'student-t', 'wilson')
        """
        out = dataclasses.asdict(self)
        out["values"] = list(self.values)
        out["interval"] = "student-t"
        out["success_interval"] = "wilson"
        return out


def distribution(
    values: Sequence[float] | np.ndarray, *, threshold: float = 0.95, level: float = 0.95
) -> Distribution:
    """Summarise per-seed values as a :class:`Distribution`.

    Args:
        values: one finite value per seed (a 1-D sequence or array, at least one value).
        threshold: a value ``>= threshold`` is a success (0.95: the spirals' test accuracy
            that counts as "learnt the mechanism").
        level: confidence level of both intervals, in (0, 1).

    Example:
        >>> from gradand.experiments._distribution import distribution
        >>> d = distribution([1.0, 0.99, 0.96, 0.80])
        >>> round(d.mean, 4), d.successes, d.n, round(d.low, 3), round(d.high, 3)
        (0.9375, 3, 4, 0.789, 1.086)
        >>> distribution([])
        Traceback (most recent call last):
        ...
        ValueError: values must hold at least one value; got 0 values
    """
    level = _check_level(level)
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float, np.integer, np.floating))
        or not math.isfinite(threshold)
    ):
        raise ValueError(f"threshold must be a finite number; got {threshold!r}")
    if isinstance(values, (str, bytes)):
        raise ValueError(f"values must be a 1-D sequence of numbers; got {values!r}")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"values must be a 1-D sequence of numbers; got {values!r}") from None
    if array.ndim != 1:
        raise ValueError(f"values must be 1-D (one value per seed); got shape {array.shape}")
    if array.size == 0:
        raise ValueError("values must hold at least one value; got 0 values")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"values must be finite; got {array[bad[0]]!r} at index {int(bad[0])}")

    n = int(array.size)
    constant = bool(array.min() == array.max())  # exactly zero spread, not the mean's round-off
    mean = float(array[0]) if constant else float(array.mean())
    std = low = high = None
    if n > 1:
        std = 0.0 if constant else float(array.std(ddof=1))
        half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
        low, high = mean - half, mean + half
    successes = int(np.count_nonzero(array >= threshold))
    success_low, success_high = wilson_interval(successes, n, level=level)
    return Distribution(
        values=tuple(float(v) for v in array),
        n=n,
        mean=mean,
        std=std,
        low=low,
        high=high,
        threshold=float(threshold),
        successes=successes,
        success_rate=successes / n,
        success_low=success_low,
        success_high=success_high,
        level=level,
    )


#: Up to this many pairs the sign-flip test enumerates every sign pattern (2**n of them).
_EXACT_PAIRS = 20


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Two conditions measured on the same seeds: the mean difference, its interval, a permutation test.

    Attributes:
        differences: ``a[i] - b[i]`` per seed.
        n: how many pairs.
        mean: the mean difference.
        low, high: the ``level`` Student-t interval for the mean difference (``None`` for one pair).
        p_value: two-sided sign-flip permutation test of "no systematic difference" (each
            pair's sign is exchangeable): the fraction of the 2**n sign patterns (random ones
            beyond 20 pairs) whose mean difference is at least as far from 0 as the one measured.
        level: the confidence level of the interval.
    """

    differences: tuple[float, ...]
    n: int
    mean: float
    low: float | None
    high: float | None
    p_value: float
    level: float

    def format(self, digits: int = 3) -> str:
        """One line: ``mean difference [interval] (n pairs), sign-flip p``.

        Example:
            >>> from gradand.experiments._distribution import paired_difference
            >>> paired_difference([1.0, 0.9, 1.0, 0.8], [0.9, 0.9, 0.95, 0.7]).format()
            '+0.063 [-0.014, +0.139] (n=4), sign-flip p=0.250'
        """
        digits = _check_count("digits", digits, 0)
        interval = "" if self.low is None else f" [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        return f"{self.mean:+.{digits}f}{interval} (n={self.n}), sign-flip p={self.p_value:.3f}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict.

        Example:
            >>> from gradand.experiments._distribution import paired_difference
            >>> paired_difference([1.0, 0.5], [0.5, 0.5]).to_json()["p_value"]
            1.0
        """
        out = dataclasses.asdict(self)
        out["differences"] = list(self.differences)
        out["interval"] = "student-t"
        out["test"] = "sign-flip permutation (two-sided)"
        return out


def paired_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, level: float = 0.95
) -> PairedDifference:
    """Compare two conditions run on the same seeds: ``a[i] - b[i]`` summarised as :class:`PairedDifference`.

    Pairing removes what the seed decides for both (e.g. the data), so a systematic
    difference shows with fewer seeds than two independent distributions would need.
    The t interval leans on the mean difference being roughly normal; the sign-flip
    permutation test does not (it assumes only that, with no systematic difference,
    each pair's difference is as likely negative as positive).

    Example:
        >>> from gradand.experiments._distribution import paired_difference
        >>> d = paired_difference([0.9, 1.0, 0.8, 1.0, 0.95], [0.85, 0.9, 0.8, 0.9, 0.9])
        >>> round(d.mean, 3), d.p_value  # all four non-zero signs alike: 4 of the 32 sign patterns
        (0.06, 0.125)
        >>> paired_difference([1.0], [1.0, 0.5])
        Traceback (most recent call last):
        ...
        ValueError: a and b must hold one value per seed each, the same seeds; got 1 and 2 values
    """
    level = _check_level(level)
    x = distribution(a).values
    y = distribution(b).values
    if len(x) != len(y):
        raise ValueError(
            f"a and b must hold one value per seed each, the same seeds; got {len(x)} and {len(y)} values"
        )
    diff = np.subtract(x, y)
    n = int(diff.size)
    summary = distribution(diff, threshold=0.0, level=level)
    measured = abs(float(diff.mean()))
    if n <= _EXACT_PAIRS:
        patterns = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
        signs = 1.0 - 2.0 * patterns
    else:
        signs = np.random.default_rng(0).choice([-1.0, 1.0], size=(100_000, n))
    means = np.abs(signs @ np.abs(diff)) / n
    p_value = float(np.mean(means >= measured - 1e-12))
    return PairedDifference(
        differences=tuple(float(v) for v in diff),
        n=n,
        mean=summary.mean,
        low=summary.low,
        high=summary.high,
        p_value=p_value,
        level=level,
    )
