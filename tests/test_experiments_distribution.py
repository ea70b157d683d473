"""Results as distributions: the intervals' properties and their textbook values."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradand.experiments._distribution import Distribution, distribution, t_quantile, wilson_interval

accuracies = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=60)
levels = st.floats(0.5, 0.999)


@given(accuracies, levels)
def test_interval_contains_the_mean(values: list[float], level: float) -> None:
    d = distribution(values, level=level)
    assert d.n == len(values)
    if d.n == 1:
        assert d.low is None and d.high is None and d.std is None
    else:
        assert d.low is not None and d.high is not None
        assert d.low <= d.mean <= d.high
        assert math.isclose(d.mean, (d.low + d.high) / 2, abs_tol=1e-12)


@given(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=2, max_size=30), st.integers(2, 5))
def test_more_seeds_of_the_same_spread_give_a_narrower_interval(values: list[float], copies: int) -> None:
    # Repeating the sample keeps its spread (the std even shrinks a little), and t and 1/√n fall.
    one, more = distribution(values), distribution(values * copies)
    if one.std == 0:
        assert more.half_width == one.half_width == 0
    elif one.std > 1e-9:  # a spread of a few ulps is all round-off
        assert more.half_width < one.half_width


@given(st.integers(1, 500))
def test_t_quantile_falls_with_degrees_of_freedom_towards_the_normal(df: int) -> None:
    assert t_quantile(0.975, df + 1) < t_quantile(0.975, df)
    assert t_quantile(0.975, df) > 1.959963984540054


@given(accuracies, st.floats(0.0, 1.0))
def test_success_rate_is_a_fraction_with_a_wilson_interval_around_it(
    values: list[float], threshold: float
) -> None:
    d = distribution(values, threshold=threshold)
    assert 0.0 <= d.success_low <= d.success_rate <= d.success_high <= 1.0
    assert d.successes == sum(v >= threshold for v in values)
    assert d.success_rate == d.successes / d.n


@given(st.integers(1, 2000), st.data(), levels)
def test_wilson_interval_stays_in_unit_range_and_holds_the_rate(
    n: int, data: st.DataObject, level: float
) -> None:
    k = data.draw(st.integers(0, n))
    low, high = wilson_interval(k, n, level=level)
    assert 0.0 <= low <= k / n <= high <= 1.0
    assert low < high


@given(st.integers(1, 1000), st.floats(0.0, 1.0))
def test_wilson_interval_shrinks_with_n_at_the_same_rate(n: int, rate: float) -> None:
    k = round(rate * n)
    low, high = wilson_interval(k, n)
    low2, high2 = wilson_interval(2 * k, 2 * n)
    assert high2 - low2 <= high - low + 1e-12


@settings(max_examples=50)
@given(levels)
def test_wider_level_gives_wider_intervals(level: float) -> None:
    values = [0.8, 0.9, 0.95, 1.0, 0.99]
    narrow, wide = distribution(values, level=level), distribution(values, level=(1 + level) / 2)
    assert wide.half_width > narrow.half_width
    assert wide.success_high - wide.success_low > narrow.success_high - narrow.success_low


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [  # standard t tables
        (0.975, 1, 12.7062047),
        (0.975, 2, 4.30265273),
        (0.975, 4, 2.77644511),
        (0.975, 19, 2.09302405),
        (0.975, 30, 2.04227246),
        (0.975, 200, 1.97189622),
        (0.975, 201, 1.97183651),
        (0.975, 1000, 1.96233908),
        (0.995, 9, 3.24983554),
        (0.95, 5, 2.01504837),
        (0.6, 3, 0.27667066),
    ],
)
def test_t_quantile_matches_tables(p: float, df: int, expected: float) -> None:
    assert t_quantile(p, df) == pytest.approx(expected, rel=1e-7)


def test_t_quantile_matches_scipy_everywhere() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 260), 500, 10**4, 10**6]:
        for p in (0.55, 0.9, 0.975, 0.995, 0.9995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8), (p, df)
            assert t_quantile(1 - p, df) == pytest.approx(stats.t.ppf(1 - p, df), rel=1e-8), (p, df)


def test_interval_is_the_textbook_student_t_interval() -> None:
    values = np.array([0.999, 0.9525, 1.0, 0.793, 0.856, 0.91, 1.0, 1.0, 0.97, 0.88])
    d = distribution(values)
    s = values.std(ddof=1)
    half = 2.2621571628 * s / math.sqrt(10)
    assert d.mean == pytest.approx(values.mean())
    assert d.std == pytest.approx(s)
    assert d.low == pytest.approx(values.mean() - half, rel=1e-9)
    assert d.high == pytest.approx(values.mean() + half, rel=1e-9)
    assert (d.successes, d.success_rate) == (6, 0.6)


def test_wilson_interval_matches_the_textbook_formula() -> None:
    # 14 successes in 20 at 95 %: Wilson (0.4810, 0.8545), as scipy's binomtest gives.
    low, high = wilson_interval(14, 20)
    assert (low, high) == pytest.approx((0.48103, 0.85452), abs=1e-5)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 10)[1] == pytest.approx(0.27753, abs=1e-5)


def test_threshold_is_inclusive() -> None:
    assert distribution([0.95, 0.9499999]).successes == 1


@given(st.floats(-1e6, 1e6, allow_nan=False), st.integers(1, 50))
def test_constant_values_have_a_zero_width_interval(value: float, n: int) -> None:
    d = distribution([value] * n)
    assert d.mean == value
    if n > 1:
        assert d.low == d.high == value and d.half_width == 0.0 and d.std == 0.0


def test_format_and_json() -> None:
    d = distribution([1.0, 0.9525, 0.999], threshold=0.95)
    text = d.format()
    assert text.startswith(f"{d.mean:.3f} ± {d.half_width:.3f} (n=3), ≥0.95: 3/3 [")
    assert d.format(digits=1).startswith("1.0 ± ")
    blob = json.dumps(d.to_json(), allow_nan=False)
    back = json.loads(blob)
    assert back["values"] == [1.0, 0.9525, 0.999]
    assert back["successes"] == 3 and back["n"] == 3 and back["level"] == 0.95
    assert back["interval"] == "student-t" and back["success_interval"] == "wilson"
    one = json.loads(json.dumps(distribution([0.5]).to_json(), allow_nan=False))
    assert one["low"] is None and one["high"] is None and one["std"] is None
    assert distribution([0.5]).format() == "0.500 (n=1), ≥0.95: 0/1 [0.00, 0.79]"


def test_distribution_is_frozen_and_accepts_arrays() -> None:
    d = distribution(np.array([0.9, 1.0], dtype=np.float32))
    assert isinstance(d, Distribution)
    assert all(type(v) is float for v in d.values)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.mean = 0.0  # type: ignore[misc]
    assert distribution((0.9, 1.0)) == distribution([0.9, 1.0])


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (([],), {}, r"values must hold at least one value; got 0 values"),
        (
            ([0.9, float("nan")],),
            {},
            r"values must be finite; got (np\.float64\()?nan\)? at index 1",
        ),
        (([0.9, float("inf")],), {}, r"values must be finite; got .*inf.* at index 1"),
        (([[0.9, 1.0]],), {}, r"values must be 1-D \(one value per seed\); got shape \(1, 2\)"),
        (("0.9",), {}, r"values must be a 1-D sequence of numbers; got '0.9'"),
        ((["a", "b"],), {}, r"values must be a 1-D sequence of numbers; got \['a', 'b'\]"),
        (([0.9],), {"threshold": float("nan")}, r"threshold must be a finite number; got nan"),
        (([0.9],), {"threshold": None}, r"threshold must be a finite number; got None"),
        (([0.9],), {"level": 1.0}, r"level must be a number in \(0, 1\), such as 0.95; got 1.0"),
        (([0.9],), {"level": 95}, r"level must be a number in \(0, 1\), such as 0.95; got 95"),
    ],
)
def test_bad_input_names_the_argument(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        distribution(*args, **kwargs)


def test_bad_quantile_and_wilson_input_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"p must be a probability in \(0, 1\); got 1"):
        t_quantile(1, 3)
    with pytest.raises(ValueError, match=r"df must be an integer >= 1; got 0"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match=r"df must be an integer >= 1; got 2.5"):
        t_quantile(0.975, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"successes must be at most n = 3; got 4"):
        wilson_interval(4, 3)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1; got 0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r"successes must be an integer >= 0; got -1"):
        wilson_interval(-1, 3)
    with pytest.raises(ValueError, match=r"digits must be an integer >= 0; got -1"):
        distribution([0.9]).format(digits=-1)
