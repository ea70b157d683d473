"""The temporal AND-mask step (paper Algorithm 1) and outer-product statistics, against references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradand
from gradand.temporal import check_temporal_hparams, temporal_and_mask_step


def _reference_run(grads, p0, *, lr, b1, b2, b3, tau, eps, wd, order):
    """A plain loop written from the algorithm's statement, for comparison."""
    p, m, v, s = p0.copy(), np.zeros_like(p0), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        if order == "before":
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        s = b3 * s + (1 - b3) * np.sign(g)
        keep = np.abs(s / (1 - b3**t)) >= tau
        step = keep * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        if order == "after":
            step = step + wd * p
        p = p - lr * step
    return p


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_temporal_step_matches_a_hand_written_reference_over_several_steps(order, tau):
    rng = np.random.default_rng(0)
    grads = rng.standard_normal((6, 10)) + 0.3
    p0 = rng.standard_normal(10)
    kw = dict(lr=0.01, b1=0.9, b2=0.99, b3=0.8, tau=tau, eps=1e-8, wd=0.1, order=order)
    p, m, v, s = p0.copy(), np.zeros(10), np.zeros(10), np.zeros(10)
    for t, g in enumerate(grads, start=1):
        out = temporal_and_mask_step(
            g,
            p,
            m,
            v,
            s,
            t,
            betas=(0.9, 0.99),
            beta3=0.8,
            threshold=tau,
            eps=1e-8,
            weight_decay=0.1,
            weight_decay_order=order,
        )
        p, m, v, s = p - 0.01 * out.direction, out.exp_avg, out.exp_avg_sq, out.sign_avg
    np.testing.assert_allclose(p, _reference_run(grads, p0, **kw), rtol=1e-12)


def test_temporal_mask_blocks_components_whose_sign_flips_every_step():
    z = np.zeros(2)
    p, m, v, s = z.copy(), z.copy(), z.copy(), z.copy()
    for t in range(1, 9):
        g = np.array([1.0, (-1.0) ** t])
        out = temporal_and_mask_step(g, p, m, v, s, t, beta3=0.9, threshold=0.5)
        m, v, s = out.exp_avg, out.exp_avg_sq, out.sign_avg
    np.testing.assert_array_equal(out.mask, [1.0, 0.0])


def test_temporal_step_keeps_float32_state_for_half_gradients():
    z = np.zeros(3, np.float32)
    out = temporal_and_mask_step(np.ones(3, np.float16), z, z, z, z, 1)
    assert out.exp_avg.dtype == np.float32 and out.direction.dtype == np.float32


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(lr=-1.0), "lr must be >= 0"),
        (dict(betas=(1.0, 0.9)), r"betas\[0\] must be in \[0, 1\)"),
        (dict(betas=(0.9,)), "betas must be a pair"),
        (dict(beta3=1.5), "beta3"),
        (dict(threshold=2.0), "threshold"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(weight_decay_order="middle"), "weight_decay_order"),
    ],
)
def test_temporal_hyperparameters_are_validated(kw, match):
    base = dict(
        lr=1e-3,
        betas=(0.9, 0.999),
        beta3=0.9,
        threshold=0.5,
        eps=1e-8,
        weight_decay=0.0,
        weight_decay_order="after",
    )
    base.update(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        check_temporal_hparams(**base)


@st.composite
def layer(draw):
    b = draw(st.integers(1, 8))
    n_in = draw(st.integers(1, 5))
    n_out = draw(st.integers(1, 4))
    # products of two values below ~1e-154 underflow to 0 in the materialised gradient (its sign
    # becomes 0) while sign(x)·sign(δ) stays ±1; keep magnitudes where both are exact
    el = st.one_of(st.just(0.0), st.floats(-10, 10).filter(lambda v: v == 0 or abs(v) > 1e-30))
    return (
        draw(hnp.arrays(np.float64, (b, n_in), elements=el)),
        draw(hnp.arrays(np.float64, (b, n_out), elements=el)),
    )


@given(layer(), st.sampled_from([gradand.Mean(), gradand.AndMask(0.5), gradand.SandMask(0.3, k=2.0)]))
def test_outer_statistics_equal_statistics_of_materialised_per_example_gradients(xd, combiner):
    x, d = xd
    per_example = d[:, :, None] * x[:, None, :]
    fast = gradand.outer_statistics(x, d, combiner)
    slow = gradand.statistics(per_example, combiner)
    assert fast.count == slow.count and fast.fields == slow.fields
    for name in fast.fields:
        np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(
        gradand.finalize(fast, combiner), gradand.combine(per_example, combiner), rtol=1e-9, atol=1e-9
    )


def test_outer_statistics_reject_geometric_mean_and_bad_shapes():
    x, d = np.ones((3, 2)), np.ones((3, 4))
    with pytest.raises(ValueError, match="do not factor"):
        gradand.outer_statistics(x, d, gradand.GeometricMean())
    with pytest.raises(ValueError, match=r"inputs \(3, 2\) and deltas \(2, 4\)"):
        gradand.outer_statistics(x, d[:2], gradand.AndMask())
    with pytest.raises(TypeError, match="real floating"):
        gradand.outer_statistics(x.astype(int), d, gradand.AndMask())


@pytest.mark.parametrize("beta3", [0.9, 0.99, 0.999])
def test_threshold_one_keeps_components_whose_sign_never_changed_despite_rounding(beta3):
    # float32 state with an array step count (as under jit/optax): ŝ drifts below 1 by rounding
    z = np.zeros(2, np.float32)
    m, v, s = z.copy(), z.copy(), z.copy()
    for t in range(1, 3001):
        g = np.array([1.0, 1.0 if t != 2000 else -1.0], np.float32)
        out = temporal_and_mask_step(g, z, m, v, s, np.float32(t), beta3=beta3, threshold=1.0)
        m, v, s = out.exp_avg, out.exp_avg_sq, out.sign_avg
        assert out.mask[0] == 1.0, t
        if 2000 <= t <= 2010:
            assert out.mask[1] == 0.0, t  # a recent disagreement is not forgotten
