"""Hypothesis strategies shared by the core's property tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradand

thresholds = st.floats(0.0, 1.0, allow_nan=False)
# Magnitudes from tiny to huge, with exact zeros and mixed signs (TorchJD-style).
element = st.one_of(
    st.just(0.0),
    st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False),
    st.sampled_from([1e-15, -1e-15, 1e15, -1e15, 1.0, -1.0]),
)


@st.composite
def stacked_grads(draw, min_envs: int = 1, max_envs: int = 7, max_side: int = 4, elements=element):
    """Float64 per-environment gradients of shape (E, *shape), rank 0 to 2 per tensor."""
    n_env = draw(st.integers(min_envs, max_envs))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=max_side))
    return draw(hnp.arrays(np.float64, (n_env, *shape), elements=elements))


def combiners(threshold=thresholds):
    """Every built-in combiner, with drawn hyperparameters."""
    return st.one_of(
        st.just(gradand.Mean()),
        st.builds(gradand.AndMask, threshold=threshold, rescale=st.booleans()),
        st.builds(gradand.GeometricMean, threshold=threshold, rescale=st.booleans()),
        st.builds(
            gradand.SandMask,
            threshold=threshold,
            k=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
            rescale=st.booleans(),
        ),
    )


def with_specials(rng: np.random.Generator, n: int, decades: int = 40) -> np.ndarray:
    """``n`` float64 values over ``±decades`` decades, with NaN, ±Inf, -0.0 and +0.0 mixed in."""
    d = rng.standard_normal(n) * 10.0 ** rng.integers(-decades, decades, n)
    special = rng.random(n)
    d[special < 0.1] = np.nan
    d[(special >= 0.1) & (special < 0.15)] = np.inf
    d[(special >= 0.15) & (special < 0.2)] = -np.inf
    d[(special >= 0.2) & (special < 0.25)] = -0.0
    d[(special >= 0.25) & (special < 0.3)] = 0.0
    return d
