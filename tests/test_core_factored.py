"""The core's factored engine equals the statistics of materialised per-environment gradients."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradand

COMBINERS = [
    gradand.Mean(),
    gradand.AndMask(threshold=0.5),
    gradand.GeometricMean(threshold=0.5),
    gradand.SandMask(threshold=0.3, k=2.0),
]


def _materialised(factors, shape, layout, scale):
    g = 0.0
    for f in factors:
        if f.inputs is None:
            g = g + f.deltas.sum(axis=1)
        elif layout == "in_out":
            g = g + np.swapaxes(f.inputs, 1, 2) @ f.deltas
        else:
            g = g + np.swapaxes(f.deltas, 1, 2) @ f.inputs
    g = g / (1.0 if scale is None else scale)
    return g.reshape(g.shape[0], *shape)


def _namespaces():
    out = [("numpy", np.asarray, np.asarray)]
    try:
        import torch

        out.append(("torch", torch.as_tensor, lambda t: t.numpy()))
    except ImportError:  # pragma: no cover
        pass
    try:
        import jax.numpy as jnp

        out.append(("jax", lambda a: jnp.asarray(a, dtype=jnp.float32), np.asarray))
    except ImportError:  # pragma: no cover
        pass
    import array_api_strict as xps

    out.append(("array-api-strict", xps.asarray, np.asarray))
    return out


NAMESPACES = _namespaces()


@pytest.mark.parametrize(("ns", "to", "back"), NAMESPACES, ids=[n[0] for n in NAMESPACES])
@settings(max_examples=40, deadline=None)
@given(
    envs=st.integers(1, 6),
    rows=st.integers(1, 5),
    n_in=st.integers(1, 5),
    n_out=st.integers(1, 4),
    calls=st.integers(1, 3),
    bias=st.booleans(),
    layout=st.sampled_from(["out_in", "in_out"]),
    combiner=st.sampled_from(COMBINERS),
    chunk=st.one_of(st.none(), st.integers(1, 4)),
    scale=st.sampled_from([None, 1024.0]),
    seed=st.integers(0, 2**16),
)
def test_layer_statistics_equal_those_of_the_materialised_gradients(
    ns, to, back, envs, rows, n_in, n_out, calls, bias, layout, combiner, chunk, scale, seed
):
    rng = np.random.default_rng(seed)
    dt = np.float32
    factors = [
        gradand.LayerFactors(
            None if bias else rng.standard_normal((envs, rows, n_in)).astype(dt),
            rng.standard_normal((envs, rows, n_out)).astype(dt),
        )
        for _ in range(calls)
    ]
    shape = (n_out,) if bias else ((n_in, n_out) if layout == "in_out" else (n_out, n_in))
    want = gradand.statistics(_materialised(factors, shape, layout, scale), combiner)
    got = gradand.layer_statistics(
        [gradand.LayerFactors(None if f.inputs is None else to(f.inputs), to(f.deltas)) for f in factors],
        combiner,
        shape=shape,
        layout=layout,
        chunk_size=chunk,
        scale=scale,
    )
    assert got.count == envs and got.shape == shape
    for name in want.fields:
        a, b = back(getattr(got, name)), np.asarray(getattr(want, name))
        if name == "sign_sum":  # exact, except where a product underflows/cancels to exactly 0
            assert np.mean(a == b) > 0.95, (a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * (1 + np.max(np.abs(b))))


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_one_example_per_environment_takes_the_outer_path_and_matches(layout):
    rng = np.random.default_rng(0)
    x, d = rng.standard_normal((50, 1, 4)), rng.standard_normal((50, 1, 3))
    c = gradand.SandMask(threshold=0.2, k=1.0)
    shape = (4, 3) if layout == "in_out" else (3, 4)
    f = [gradand.LayerFactors(x, d)]
    got = gradand.layer_statistics(f, c, shape=shape, layout=layout)
    want = gradand.statistics(_materialised(f, shape, layout, None), c)
    np.testing.assert_array_equal(got.sign_sum, want.sign_sum)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-10)
    np.testing.assert_allclose(got.m2, want.m2, rtol=1e-8, atol=1e-12)


def test_a_non_finite_delta_is_reported_with_the_parameter_name_or_propagated():
    x = np.ones((2, 3, 4))
    d = np.ones((2, 3, 2))
    d[1, 0, 0] = np.nan
    f = [gradand.LayerFactors(x, d)]
    c = gradand.AndMask()
    with pytest.raises(ValueError, match=r"layer1\.weight \(shape \(2, 4\)\): a per-environment gradient"):
        gradand.layer_statistics(f, c, shape=(2, 4), name="layer1.weight")
    s = gradand.layer_statistics(f, c, shape=(2, 4), nan_policy="propagate")
    out = gradand.finalize(s, c)
    assert np.all(np.isnan(out[0])) and np.all(np.isfinite(out[1]))
    s = gradand.layer_statistics(f, c, shape=(2, 4), nan_policy="zero")
    assert np.all(np.isfinite(gradand.finalize(s, c)))


@pytest.mark.parametrize(
    ("factors", "kwargs", "match"),
    [
        ([], {}, "factors is empty"),
        (
            [gradand.LayerFactors(np.ones((2, 3, 4)), np.ones((3, 3, 2)))],
            {},
            r"inputs must be \(E, rows, in\)",
        ),
        ([gradand.LayerFactors(None, np.ones((2, 3)))], {}, r"deltas must be \(E, rows, out\)"),
        (
            [gradand.LayerFactors(None, np.ones((2, 1, 2))), gradand.LayerFactors(None, np.ones((3, 1, 2)))],
            {},
            "must cover the same environments",
        ),
        ([gradand.LayerFactors(None, np.ones((2, 1, 2)))], {"chunk_size": 0}, "chunk_size must be"),
        ([gradand.LayerFactors(None, np.ones((2, 1, 2)))], {"layout": "oi"}, "layout must be"),
    ],
)
def test_bad_factors_are_refused_by_name(factors, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gradand.layer_statistics(factors, gradand.AndMask(), shape=(2,), name="w", **kwargs)


def test_factors_of_mixed_precision_are_combined_in_the_wider_dtype():
    rng = np.random.default_rng(1)
    x, d = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 2))
    c = gradand.AndMask(0.5)
    mixed = gradand.layer_statistics(
        [gradand.LayerFactors(x.astype(np.float16), d.astype(np.float32))], c, shape=(2, 5)
    )
    want = gradand.statistics(np.swapaxes(d, 1, 2) @ x.astype(np.float16).astype(np.float64), c)
    assert mixed.dtype == np.float32
    np.testing.assert_allclose(mixed.mean, want.mean, rtol=1e-5, atol=1e-6)
