"""gradand.backends.jax optax transformations against hand-written references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import gradand  # noqa: E402
from gradand.backends import jax as gj  # noqa: E402

SHAPES = {"w": (3, 4), "b": (4,)}


def per_env_updates(steps: int, envs: int = 5, seed: int = 0) -> list[dict]:
    """Per-environment gradients: a shared drift on some components, noise everywhere."""
    rng = np.random.default_rng(seed)
    drift = {k: rng.standard_normal(s) * (rng.random(s) < 0.5) for k, s in SHAPES.items()}
    return [
        {k: (2 * drift[k] + rng.standard_normal((envs, *s))).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(steps)
    ]


def start_params(seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def adam_reference(params, grads_seq, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Adam (Kingma & Ba), float64, one dict of arrays per step; returns the params after each step."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    out = []
    for t, g in enumerate(grads_seq, start=1):
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            p[k] = p[k] - lr * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
        out.append({k: x.copy() for k, x in p.items()})
    return out


def temporal_reference(params, grads_seq, lr, thresholds, *, b1=0.9, b2=0.999, beta3=0.9, eps=1e-8,
                       weight_decay=0.0, order="after"):  # fmt: skip
    """Paper Algorithm 1 written out in float64 numpy; returns params after each step and the margins.

    The margin is the smallest distance of |ŝ| from τ: a float32 run agrees with this float64
    reference only when no component sits on the threshold.
    """
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m, v, s = ({k: np.zeros_like(x) for k, x in p.items()} for _ in range(3))
    out, margin = [], np.inf
    for t, (grads, tau) in enumerate(zip(grads_seq, thresholds), start=1):
        for k in p:
            g = grads[k].astype(np.float64)
            if order == "before":
                g = g + weight_decay * p[k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g**2
            s[k] = beta3 * s[k] + (1 - beta3) * np.sign(g)
            s_hat = s[k] / (1 - beta3**t)
            margin = min(margin, float(np.min(np.abs(np.abs(s_hat) - tau))))
            mask = np.abs(s_hat) >= tau
            direction = mask * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            if order == "after":
                direction = direction + weight_decay * p[k]
            p[k] = p[k] - lr * direction
        out.append({k: x.copy() for k, x in p.items()})
    return out, margin


def assert_params_close(actual, expected, rtol=1e-4, atol=1e-5):
    for k in expected:
        np.testing.assert_allclose(np.asarray(actual[k], np.float64), expected[k], rtol=rtol, atol=atol)


def run_optax(opt, params, grads_seq):
    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = jax.tree.map(jnp.asarray, params)
    state = opt.init(params)
    history = []
    for grads in grads_seq:
        params, state = step(params, state, jax.tree.map(jnp.asarray, grads))
        history.append(params)
    return history, state


@pytest.mark.parametrize(
    "combiner", [gradand.AndMask(threshold=0.6), gradand.SandMask(threshold=0.2, k=10.0)], ids=repr
)
def test_reduce_environments_chained_with_adam_matches_core_then_hand_written_adam(combiner):
    params, grads_seq = start_params(), per_env_updates(steps=4)
    opt = optax.chain(gj.reduce_environments(combiner), optax.adam(1e-2))
    history, state = run_optax(opt, params, grads_seq)
    combined = [{k: gradand.combine(g[k], combiner) for k in g} for g in grads_seq]
    for actual, expected in zip(history, adam_reference(params, combined, lr=1e-2)):
        assert_params_close(actual, expected)
    # The state logs the last step's per-leaf survivor fraction, as the core reports it.
    _, info = gradand.combine(grads_seq[-1]["w"], combiner, return_info=True)
    np.testing.assert_allclose(state[0].survivor_fraction["w"], info.survivor_fraction, rtol=1e-6)
    assert float(state[0].survivor_fraction["w"]) < 1.0


def test_reduce_environments_rejects_updates_without_environment_axis():
    opt = gj.reduce_environments(gradand.AndMask())
    params = {"w": jnp.zeros(())}
    with pytest.raises(ValueError, match=r"updates\['w'\] has shape \(\) and so no environment axis"):
        opt.update(params, opt.init(params))
    with pytest.raises(TypeError, match="combiner must be a gradand combiner"):
        gj.reduce_environments(0.5)


@pytest.mark.parametrize(("weight_decay", "order"), [(0.0, "after"), (0.05, "after"), (0.05, "before")])
def test_temporal_and_mask_matches_hand_written_algorithm_1(weight_decay, order):
    params = start_params()
    grads_seq = [{k: g[k][0] for k in g} for g in per_env_updates(steps=6, seed=2)]
    opt = gj.temporal_and_mask(1e-2, threshold=0.5, weight_decay=weight_decay, weight_decay_order=order)
    history, state = run_optax(opt, params, grads_seq)
    expected, margin = temporal_reference(
        params, grads_seq, 1e-2, [0.5] * 6, weight_decay=weight_decay, order=order
    )
    assert margin > 1e-3
    for actual, exp in zip(history, expected):
        assert_params_close(actual, exp)
    assert isinstance(state[0], gj.TemporalAndMaskState) and int(state[0].count) == 6


def test_temporal_mask_freezes_a_component_whose_gradient_sign_keeps_flipping():
    opt = gj.temporal_and_mask(0.1, threshold=0.5)
    grads_seq = [{"w": np.array([1.0, (-1.0) ** t], np.float32)} for t in range(4)]
    history, state = run_optax(opt, {"w": np.zeros(2, np.float32)}, grads_seq)
    moved = [np.asarray(h["w"]) for h in history]
    # Step 1 sees one vote per component; afterwards the flipping component is masked.
    assert moved[0][1] != 0.0
    assert all(m[1] == moved[0][1] for m in moved[1:])
    assert all(b[0] < a[0] for a, b in itertools.pairwise(moved))  # the consistent component keeps moving
    assert float(state[0].survivor_fraction["w"]) == 0.5


def test_threshold_injected_with_inject_hyperparams_changes_the_mask_mid_training():
    params = start_params()
    grads_seq = [{k: g[k][1] for k in g} for g in per_env_updates(steps=6, seed=3)]
    opt = optax.inject_hyperparams(gj.temporal_and_mask)(learning_rate=1e-2, threshold=0.0)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    p, state = jax.tree.map(jnp.asarray, params), opt.init(jax.tree.map(jnp.asarray, params))
    history = []
    for t, grads in enumerate(grads_seq):
        if t == 3:
            state.hyperparams["threshold"] = jnp.asarray(0.9)
        p, state = step(p, state, jax.tree.map(jnp.asarray, grads))
        history.append(p)
    expected, margin = temporal_reference(params, grads_seq, 1e-2, [0.0] * 3 + [0.9] * 3)
    assert margin > 1e-3
    for actual, exp in zip(history, expected):
        assert_params_close(actual, exp)
    assert float(state.inner_state[0].survivor_fraction["w"]) < 1.0  # τ = 0.9 masks something


def test_temporal_state_is_a_namedtuple_checkpoint_that_resumes_exactly():
    params = jax.tree.map(jnp.asarray, start_params())
    grads_seq = [jax.tree.map(jnp.asarray, {k: g[k][0] for k in g}) for g in per_env_updates(steps=4)]
    opt = gj.temporal_and_mask(1e-2, threshold=0.5)
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(g, s, p)))
    state = opt.init(params)
    for g in grads_seq[:2]:
        params, state = step(params, state, g)
    assert state[0]._fields == ("count", "mu", "nu", "sign_avg", "survivor_fraction")
    leaves, treedef = jax.tree.flatten(state)
    checkpoint = [np.asarray(x) for x in leaves]  # what a checkpointer writes
    restored = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in checkpoint])
    resumed, straight = (params, restored), (params, state)
    for g in grads_seq[2:]:
        resumed, straight = step(*resumed, g), step(*straight, g)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(a, b)


def test_temporal_half_precision_params_keep_float32_moments():
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    opt = gj.temporal_and_mask(1e-2)
    state = opt.init(params)
    assert state[0].mu["w"].dtype == jnp.float32 and state[0].sign_avg["w"].dtype == jnp.float32
    updates, state = opt.update({"w": jnp.array([1.0, -1.0, 2.0], jnp.bfloat16)}, state, params)
    assert updates["w"].dtype == jnp.bfloat16 and state[0].nu["w"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(updates["w"], np.float32), [-1e-2, 1e-2, -1e-2], rtol=1e-2)


def test_temporal_hyperparameters_are_validated_and_weight_decay_needs_params():
    with pytest.raises(ValueError, match="threshold must be in"):
        gj.temporal_and_mask(1e-2, threshold=1.5)
    with pytest.raises(ValueError, match="beta3 must be in"):
        gj.temporal_and_mask(1e-2, beta3=1.0)
    with pytest.raises(ValueError, match="weight_decay_order must be"):
        gj.temporal_and_mask(1e-2, weight_decay_order="middle")
    opt = gj.scale_by_temporal_and_mask(weight_decay=0.1)
    with pytest.raises(ValueError, match="needs the current parameters"):
        opt.update(jnp.ones(2), opt.init(jnp.ones(2)))
