"""The JAX and TensorFlow loops mask exactly what the numpy core masks, and patchwork agrees across backends.

Adam's first step moves a parameter by ``lr · g / (|g| + eps)``: by ``lr`` in
the direction of ``-sign(g)`` where the combined gradient is non-zero, and
not at all where the mask removed it. So one step reveals the mask and the
sign of every component of the update the backend combined.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradand
from gradand.experiments import patchwork

COMBINERS = [gradand.AndMask(threshold=0.5), gradand.GeometricMean(threshold=1.0)]


def _data(seed=0, envs=4, n=8):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((envs, n, 3)).astype(np.float32)
    y = (rng.random((envs, n)) > 0.5).astype(np.float32)
    return x, y


def _assert_first_adam_step_follows_the_core(before, after, expected, lr):
    for b, a, g in zip(before, after, expected):
        moved = (b - a) / lr
        masked = g == 0
        np.testing.assert_allclose(moved[masked], 0.0, atol=1e-6)
        big = np.abs(g) > 1e-4  # tiny components sit inside Adam's eps; their direction is still right
        np.testing.assert_allclose(moved[big], np.sign(g[big]), atol=1e-2)
        assert np.all(np.sign(moved[~masked]) == np.sign(g[~masked]))


@pytest.mark.parametrize("combiner", COMBINERS)
def test_jax_loop_applies_the_core_combination_of_per_environment_gradients(combiner):
    pytest.importorskip("optax")
    import jax
    import optax

    from gradand.experiments.jax_training import MLPSpec, apply_mlp, init_mlp, train_classifier

    x, y = _data()
    spec = MLPSpec(in_features=3, out_features=1, hidden_units=5, hidden_layers=2)
    params, state = init_mlp(spec, 7)

    def env_loss(p, xe, ye):
        out, _ = apply_mlp(spec, p, state, xe, train=True)
        return optax.sigmoid_binary_cross_entropy(out[:, 0], ye).mean()

    per_env = [jax.grad(env_loss)(params, x[e], y[e]) for e in range(len(x))]
    names = sorted(params)
    expected = [gradand.combine(np.stack([np.asarray(g[k]) for g in per_env]), combiner) for k in names]
    out = train_classifier(
        spec, train_x=x, train_y=y, eval_sets={}, combiner=combiner, loss="bce", epochs=1, batch_size=8,
        lr=1e-3, seed=7, show_progress=False,
    )  # fmt: skip
    before = [np.asarray(params[k]) for k in names]
    after = [np.asarray(out["params"][k]) for k in names]
    _assert_first_adam_step_follows_the_core(before, after, expected, 1e-3)
    assert 0 < out["survivor_fraction"] <= 1


@pytest.mark.parametrize("combiner", COMBINERS)
def test_tensorflow_loop_applies_the_core_combination_of_per_environment_gradients(combiner):
    tf = pytest.importorskip("tensorflow")

    from gradand.experiments.tf_training import build_mlp, train_classifier

    x, y = _data(seed=1)
    model = build_mlp(3, 1, hidden_units=5, hidden_layers=2, seed=3)
    variables = model.trainable_variables
    before = [v.numpy().copy() for v in variables]
    per_env = []
    for e in range(len(x)):
        with tf.GradientTape() as tape:
            logits = model(x[e], training=True)[:, 0]
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y[e], logits=logits))
        per_env.append([g.numpy() for g in tape.gradient(loss, variables)])
    expected = [gradand.combine(np.stack([g[i] for g in per_env]), combiner) for i in range(len(variables))]
    train_classifier(
        model, train_x=x, train_y=y, eval_sets={}, combiner=combiner, loss="bce", epochs=1, batch_size=8,
        lr=1e-3, show_progress=False,
    )  # fmt: skip
    after = [v.numpy() for v in variables]
    _assert_first_adam_step_follows_the_core(before, after, expected, 1e-3)


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_patchwork_on_jax_and_tensorflow_follows_the_numpy_trajectory(backend):
    if backend == "jax":
        pytest.importorskip("optax")
        from gradand.experiments.jax_training import train_patchwork
    else:
        pytest.importorskip("tensorflow")
        from gradand.experiments.tf_training import train_patchwork
    for combiner in patchwork.default_combiners().values():
        want = patchwork.train(combiner, environments=(0, 1), steps=150)
        got = train_patchwork(combiner, environments=(0, 1), steps=150)
        tol = 1e-4 if backend == "jax" else 1e-9  # the JAX run is float32, TensorFlow's float64
        np.testing.assert_allclose(got.trajectory, want.trajectory, atol=tol)
        assert got.heldout_loss == pytest.approx(want.heldout_loss, abs=10 * tol)
