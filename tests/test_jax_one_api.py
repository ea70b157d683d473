"""One API (issue 12) in JAX: the three layers, Result, env_ids, deprecated aliases, consistency helpers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import gradand  # noqa: E402
from gradand.backends import jax as gj  # noqa: E402

D, H = 3, 5


def params0(seed: int = 0) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "l1": {"w": jax.random.normal(k1, (D, H)), "b": jnp.full((H,), 0.1)},
        "out": {"w": jax.random.normal(k2, (H, 1)) / 2},
        "scale": jnp.ones(()),
    }


def env_loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """One environment's loss: x (n, D), y (n,); dense layers visible to the factored path."""
    h = jnp.tanh(gj.dense(x, p["l1"]["w"], p["l1"]["b"]))
    logits = gj.dense(h, p["out"]["w"])[..., 0] * p["scale"]
    return jnp.mean(jax.nn.softplus(logits) - y * logits)


def example_loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """One example's loss (x (D,), y ()), for env_ids."""
    return env_loss(p, x[None], y[None])


def batch(envs: int = 6, n: int = 4, seed: int = 1) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((envs, n, D)).astype(np.float32)
    rule = rng.standard_normal((envs, 1, D)).astype(np.float32)
    y = (np.einsum("end,ekd->en", x, rule) + x[..., 0] > 0).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def is_info(x) -> bool:
    return isinstance(x, gradand.MaskInfo)


def close(a, b, atol=1e-5) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=atol)


C = gradand.AndMask(threshold=0.5)


@pytest.mark.parametrize("method", ["vectorized", "streaming", "factored"])
def test_result_loss_is_the_mean_of_losses_and_summary_is_summarize_of_infos(method):
    p, (x, y) = params0(), batch()
    (loss, r), grads = jax.jit(gj.value_and_grad(env_loss, C, method=method))(p, x, y)
    assert isinstance(r, gradand.Result) and r.aux is None
    np.testing.assert_allclose(loss, jnp.mean(r.losses), rtol=1e-6)
    np.testing.assert_allclose(r.loss, loss)
    infos = jax.tree.leaves(r.infos, is_leaf=is_info)
    assert all(is_info(i) for i in infos)
    assert jax.tree.structure(r.infos, is_leaf=is_info) == jax.tree.structure(p)
    sizes = [math.prod(g.shape) for g in jax.tree.leaves(grads)]
    want = gradand.summarize(infos, sizes)
    np.testing.assert_allclose(r.summary.survivor_fraction, want.survivor_fraction, rtol=1e-6)
    np.testing.assert_allclose(r.summary.agreement, want.agreement, rtol=1e-6)
    assert 0.0 < float(r.summary.survivor_fraction) < 1.0


def test_entry_point_is_the_three_layers_composed():
    p, (x, y) = params0(), batch()
    (_, r), grads = gj.value_and_grad(env_loss, C)(p, x, y)
    for source in (gj.vectorized_statistics, gj.streaming_statistics, gj.factored_statistics):
        losses, stats = source(env_loss, C, p, x, y)
        g, infos = gj.finalize_gradients(stats, C)
        close(g, grads)
        close(losses, r.losses)
        close(infos, r.infos)


def test_factored_path_hands_every_dense_leaf_to_the_core_engine(monkeypatch):
    calls = []
    engine = gradand.layer_statistics

    def spy(factors, combiner, **kw):
        calls.append((kw["name"], [f.inputs is None for f in factors], kw["layout"]))
        return engine(factors, combiner, **kw)

    monkeypatch.setattr(gradand, "layer_statistics", spy)
    p, (x, y) = params0(), batch()
    (_, _), fast = gj.value_and_grad(env_loss, C, method="factored")(p, x, y)
    names = sorted(name for name, _, _ in calls)
    assert names == ["grads['l1']['b']", "grads['l1']['w']", "grads['out']['w']"]  # not 'scale'
    assert all(layout == "in_out" for _, _, layout in calls)
    assert dict((n, biases) for n, biases, _ in calls)["grads['l1']['b']"] == [True]
    close(fast, gj.value_and_grad(env_loss, C)(p, x, y)[1])


@pytest.mark.parametrize("method", ["vectorized", "factored"])
@pytest.mark.parametrize("jit", [False, True])
def test_env_ids_of_different_sizes_equal_the_per_environment_loop(jit, method):
    rng = np.random.default_rng(3)
    sizes = [3, 9, 1, 5]
    ids = jnp.asarray(rng.permutation(np.repeat(np.arange(4), sizes)))
    x = jnp.asarray(rng.standard_normal((len(ids), D)), jnp.float32)
    y = (x[:, 0] > 0).astype(jnp.float32)
    p = params0()
    for c in (C, gradand.SandMask(threshold=0.3, k=10.0), gradand.GeometricMean(threshold=0.5)):
        f = gj.value_and_grad(example_loss, c, num_envs=4, method=method)
        (loss, r), grads = (jax.jit(f) if jit else f)(p, x, y, env_ids=ids)
        per_env = [jax.value_and_grad(env_loss)(p, x[ids == e], y[ids == e]) for e in range(4)]
        want_losses = jnp.stack([v for v, _ in per_env])
        want = gj.combine(jax.tree.map(lambda *g: jnp.stack(g), *[g for _, g in per_env]), c)
        close(grads, want, atol=2e-5)
        np.testing.assert_allclose(r.losses, want_losses, rtol=1e-5)
        np.testing.assert_allclose(loss, jnp.mean(want_losses), rtol=1e-5)


@pytest.mark.parametrize("method", ["vectorized", "factored"])
@pytest.mark.parametrize(
    "c", [C, gradand.SandMask(threshold=0.3, k=10.0), gradand.GeometricMean(threshold=0.5)], ids=repr
)
def test_an_environment_without_examples_raises_eagerly_and_is_left_out_under_jit(method, c):
    ids = jnp.array([0, 0, 2, 2, 2, 0])  # environment 1 is empty
    x, y = batch(envs=1, n=6)
    x, y = x[0], y[0]
    f = gj.value_and_grad(example_loss, c, num_envs=3, method=method)
    with pytest.raises(ValueError, match=r"environments \[1\] of num_envs=3 have no example"):
        f(params0(), x, y, env_ids=ids)
    (loss, r), grads = jax.jit(f)(params0(), x, y, env_ids=ids)
    assert bool(jnp.isnan(r.losses[1])) and not bool(jnp.isnan(loss))
    two = jnp.array([0, 0, 1, 1, 1, 0])
    (loss2, _r2), want = gj.value_and_grad(example_loss, c, num_envs=2)(params0(), x, y, env_ids=two)
    close(grads, want)  # the empty environment casts no vote and does not count
    np.testing.assert_allclose(loss, loss2, rtol=1e-6)


@pytest.mark.parametrize("method", ["vectorized", "factored"])
def test_an_id_out_of_range_under_jit_makes_the_losses_and_the_update_nan(method):
    x, y = batch(envs=1, n=6)
    x, y = x[0], y[0]
    f = jax.jit(gj.value_and_grad(example_loss, C, num_envs=2, method=method))
    (loss, _r), grads = f(params0(), x, y, env_ids=jnp.array([0, 1, 0, 1, 5, 0]))
    assert bool(jnp.isnan(loss))
    assert all(bool(jnp.isnan(g).any()) for g in jax.tree.leaves(grads) if g.size)


def test_env_ids_errors():
    x, y = batch(envs=1, n=6)
    x, y = x[0], y[0]
    with pytest.raises(ValueError, match="env_ids needs num_envs"):
        gj.value_and_grad(example_loss, C)(params0(), x, y, env_ids=jnp.zeros(6, jnp.int32))
    with pytest.raises(ValueError, match="one environment id per example"):
        gj.value_and_grad(example_loss, C, num_envs=2)(params0(), x, y, env_ids=jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match=r"must lie in \[0, num_envs=2\)"):
        gj.value_and_grad(example_loss, C, num_envs=2)(params0(), x, y, env_ids=jnp.arange(6))


def test_loss_scale_gives_the_unscaled_update():
    p, (x, y) = params0(), batch()
    for method in ("vectorized", "factored"):
        (loss, _r), want = gj.value_and_grad(env_loss, C, method=method)(p, x, y)
        (loss_s, _r_s), got = gj.value_and_grad(env_loss, C, method=method, loss_scale=1024.0)(p, x, y)
        close(got, want)
        np.testing.assert_allclose(loss_s, loss, rtol=1e-6)


def test_deprecated_aliases_warn_and_give_the_same_numbers():
    p, (x, y) = params0(), batch()
    (loss, r), want = gj.value_and_grad(env_loss, C, method="factored")(p, x, y)
    with pytest.warns(DeprecationWarning, match="factored_value_and_grad is deprecated"):
        old = gj.factored_value_and_grad(env_loss, C)
    (loss_o, info), grads = old(p, x, y)
    close(grads, want)
    np.testing.assert_allclose(loss_o, loss)
    assert type(info).__name__ == "GradInfo"
    close(info.survivor_fraction, jax.tree.map(lambda i: i.survivor_fraction, r.infos, is_leaf=is_info))
    with pytest.warns(DeprecationWarning, match="chunk= is deprecated"):
        chunked = gj.value_and_grad(env_loss, C, chunk=2)
    close(chunked(p, x, y)[1], gj.value_and_grad(env_loss, C, chunk_size=2)(p, x, y)[1])
    with pytest.warns(DeprecationWarning, match="fallback='vmap' is deprecated"):
        vmapped = gj.value_and_grad(env_loss, C, method="factored", fallback="vmap")
    close(vmapped(p, x, y)[1], want)
    assert gj.GradInfo._fields == ("losses", "survivor_fraction", "agreement", "aux")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gj.value_and_grad(env_loss, C, chunk_size=2)  # the new names do not warn


def _finite_difference_hessian(f, theta, h=1e-3):
    n = theta.size
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            ei, ej = np.eye(n)[i] * h, np.eye(n)[j] * h
            out[i, j] = (
                f(theta + ei + ej) - f(theta + ei - ej) - f(theta - ei + ej) + f(theta - ei - ej)
            ) / (4 * h * h)
    return out


def test_environment_losses_and_hessians_match_numpy_finite_differences():
    p, (x, y) = params0(), batch(envs=3, n=4)
    subset = ["['out']['w']", "['scale']"]
    losses, theta = gj.environment_losses(env_loss, p, x, y, subset=subset)
    hessians = gj.environment_hessians(env_loss, p, x, y, subset=subset)
    assert theta.dtype == np.float64 and theta.shape == (H + 1,)
    assert hessians.shape == (3, H + 1, H + 1)
    np.testing.assert_allclose(theta, np.concatenate([np.ravel(p["out"]["w"]), [1.0]]))
    for e in range(3):
        np.testing.assert_allclose(losses[e](theta), float(env_loss(p, x[e], y[e])), rtol=1e-6)
        fd = _finite_difference_hessian(losses[e], theta, h=3e-2)
        np.testing.assert_allclose(hessians[e], fd, atol=2e-2, rtol=2e-2)
        np.testing.assert_array_equal(hessians[e], hessians[e].T)


def test_environment_losses_with_env_ids_and_errors():
    ids = jnp.array([0, 1, 1, 0, 1])
    x, y = batch(envs=1, n=5)
    x, y = x[0], y[0]
    losses, theta = gj.environment_losses(example_loss, params0(), x, y, env_ids=ids, num_envs=2)
    for e in range(2):
        np.testing.assert_allclose(
            losses[e](theta), float(env_loss(params0(), x[ids == e], y[ids == e])), rtol=1e-6
        )
    with pytest.raises(ValueError, match="not leaves of params"):
        gj.environment_losses(env_loss, params0(), x[None], y[None], subset=["['nope']"])
    with pytest.raises(ValueError, match="theta must have shape"):
        losses[0](np.zeros(3))
