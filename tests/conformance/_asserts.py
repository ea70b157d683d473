"""Reusable assertions: what every entry point of every backend must satisfy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import gradand

from ._scenarios import IN, OUT, Scenario, as_numpy, oracle

#: float32 computations compared with the float64 oracle.
RTOL, ATOL = 2e-4, 2e-5


def assert_updates_match(scenario: Scenario, updates: Mapping[str, Any], *, rtol: float = RTOL) -> None:
    """Each tensor's update equals the numpy core's, NaN/Inf exactly where the oracle has them."""
    expected, _ = oracle(scenario)
    for name, want in expected.items():
        got = as_numpy(updates[name])
        assert got.shape == want.shape, (name, got.shape, want.shape)
        bad = ~np.isfinite(want)
        np.testing.assert_array_equal(~np.isfinite(got), bad, err_msg=f"{name}: non-finite where the core is")
        np.testing.assert_allclose(
            got[~bad],
            want[~bad],
            rtol=rtol,
            atol=ATOL * (1 + np.abs(want[~bad]).max(initial=0)),
            err_msg=f"{scenario.name}: {name}",
        )


def assert_result_is_consistent(scenario: Scenario, result: gradand.Result, infos: Sequence[Any]) -> None:
    """``loss`` is the mean of ``losses`` (as the core's), ``summary`` is ``summarize(infos, sizes)``."""
    assert isinstance(result, gradand.Result), type(result)
    _, want = oracle(scenario)
    losses = as_numpy(result.losses)
    assert losses.shape == (scenario.envs,), losses.shape
    finite = np.isfinite(want.losses)
    np.testing.assert_allclose(losses[finite], want.losses[finite], rtol=1e-4)
    if finite.all():
        np.testing.assert_allclose(as_numpy(result.loss), np.mean(losses), rtol=1e-5)
    assert len(infos) == 2, infos
    for got, expected in zip(infos, want.infos):
        for k in range(2):
            a, b = float(as_numpy(got[k])), float(as_numpy(expected[k]))
            if np.isfinite(b):
                assert abs(a - b) <= 1e-4 + 1e-4 * abs(b), (scenario.name, k, a, b)
    summary = gradand.summarize([gradand.MaskInfo(*(as_numpy(v) for v in i)) for i in infos], [OUT * IN, OUT])
    for k in range(2):
        np.testing.assert_allclose(as_numpy(result.summary[k]), summary[k], rtol=1e-5, equal_nan=True)


def assert_raises_on_nan(call: Any) -> None:
    """``nan_policy="raise"`` with a NaN gradient: an error that says NaN or Inf."""
    import pytest

    with pytest.raises(Exception, match=r"NaN|nan") as info:
        call()
    assert "Traceback" not in str(info.value)
