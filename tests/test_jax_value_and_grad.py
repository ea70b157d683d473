"""gradand.backends.jax.value_and_grad: per-environment gradients combined, against the numpy core."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
checkify = pytest.importorskip("jax.experimental.checkify")

import gradand  # noqa: E402
from gradand.backends import jax as gj  # noqa: E402

ENVS, N, D, H = 8, 5, 3, 6

COMBINERS = {
    "mean": gradand.Mean(),
    "and_mask": gradand.AndMask(threshold=0.5),
    "geometric_mean": gradand.GeometricMean(threshold=0.5),
    "sand_mask": gradand.SandMask(threshold=0.2, k=10.0),
}


def init_params(seed: int = 0, dtype=jnp.float32) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "hidden": {"w": jax.random.normal(k1, (D, H), dtype), "b": jnp.full((H,), 0.1, dtype)},
        "out": {"w": jax.random.normal(k2, (H,), dtype) / 2, "b": jnp.zeros((), dtype)},
    }


def make_batch(seed: int = 1, envs: int = ENVS) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((envs, N, D)).astype(np.float32)
    shortcut = rng.standard_normal((envs, 1, D)).astype(np.float32)  # each environment its own rule
    y = (np.einsum("end,ekd->en", x, shortcut) + x[..., 0] > 0).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def loss_fn(params: dict, batch: tuple) -> jax.Array:
    """Binary cross-entropy of a small MLP on one environment's (examples, features) batch."""
    x, y = batch
    h = jax.nn.relu(x @ params["hidden"]["w"] + params["hidden"]["b"])
    logits = h @ params["out"]["w"] + params["out"]["b"]
    return jnp.mean(jax.nn.softplus(logits) - y * logits)


def loss_with_aux(params: dict, batch: tuple) -> tuple[jax.Array, dict]:
    x, y = batch
    loss = loss_fn(params, batch)
    return loss, {"positives": jnp.sum(y), "first": x[0]}


_single_grad = jax.jit(jax.value_and_grad(loss_fn))


def core_reference(params, batch, combiner):
    """Oracle: each environment's gradient on its own (a jitted jax.grad in a loop), the numpy core."""
    x, y = batch
    losses, grads = zip(*(_single_grad(params, (x[e], y[e])) for e in range(x.shape[0])))
    stacked = jax.tree.map(lambda *g: np.stack([np.asarray(a, dtype=np.float32) for a in g]), *grads)
    update = jax.tree.map(lambda g: gradand.combine(g, combiner), stacked)
    fraction = jax.tree.map(lambda g: float(gradand.combine(g, combiner, return_info=True)[1][0]), stacked)
    return np.array([float(v) for v in losses]), update, fraction


def fractions(result: gradand.Result):
    """Each leaf's survivor fraction, a pytree like the gradients."""
    return jax.tree.map(lambda i: i.survivor_fraction, result.infos, is_leaf=is_info)


def is_info(x) -> bool:
    return isinstance(x, gradand.MaskInfo)


def assert_tree_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a, dtype=np.float64), np.asarray(e, dtype=np.float64)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(COMBINERS))
def test_value_and_grad_equals_numpy_core_on_each_environments_gradient(name):
    combiner = COMBINERS[name]
    params, batch = init_params(), make_batch()
    (loss, info), grads = jax.jit(gj.value_and_grad(loss_fn, combiner))(params, batch)
    losses, expected, fraction = core_reference(params, batch, combiner)
    assert_tree_close(grads, expected, rtol=1e-4, atol=1e-6)
    assert_tree_close(fractions(info), fraction, rtol=0, atol=1e-6)
    np.testing.assert_allclose(info.losses, losses, rtol=1e-6)
    np.testing.assert_allclose(loss, losses.mean(), rtol=1e-6)
    assert jax.tree.structure(info.infos, is_leaf=is_info) == jax.tree.structure(params)
    if name != "mean":
        assert min(jax.tree.leaves(fraction)) < 1.0  # the environments disagree somewhere


def test_mean_combiner_is_jax_grad_of_the_mean_loss():
    params, batch = init_params(), make_batch()
    (loss, _), grads = jax.jit(gj.value_and_grad(loss_fn, gradand.Mean()))(params, batch)
    mean_loss = lambda p: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(p, batch))  # noqa: E731
    expected_loss, expected = jax.value_and_grad(mean_loss)(params)
    assert_tree_close(grads, expected, rtol=1e-5)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)


def test_jit_and_eager_give_the_same_result():
    params, batch = init_params(), make_batch()
    f = gj.value_and_grad(loss_fn, gradand.AndMask(threshold=0.7), has_aux=False)
    assert_tree_close(jax.jit(f)(params, batch), f(params, batch), rtol=1e-5)


_DENSE_WITH_AUX = jax.jit(gj.value_and_grad(loss_with_aux, gradand.AndMask(threshold=0.5), has_aux=True))


@pytest.mark.parametrize("chunk", [1, 3, 20])
def test_chunked_scan_equals_all_environments_at_once(chunk):
    """Folding the statistics over chunks (lax.scan, plus a remainder chunk) changes nothing."""
    combiner = gradand.AndMask(threshold=0.5)
    params, batch = init_params(), make_batch()
    chunked = gj.value_and_grad(loss_with_aux, combiner, has_aux=True, chunk_size=chunk)
    (loss_d, info_d), grads_d = _DENSE_WITH_AUX(params, batch)
    (loss_c, info_c), grads_c = jax.jit(chunked)(params, batch)
    assert_tree_close(grads_c, grads_d, rtol=1e-5, atol=1e-7)
    assert fractions(info_c) == fractions(info_d)  # identical masks
    np.testing.assert_array_equal(info_c.losses, info_d.losses)
    assert_tree_close(info_c.aux, info_d.aux, rtol=0, atol=0)
    np.testing.assert_allclose(loss_c, loss_d, rtol=1e-6)


def test_has_aux_returns_each_environments_aux_stacked():
    params, batch = init_params(), make_batch()
    (_, info), _ = jax.jit(gj.value_and_grad(loss_with_aux, gradand.AndMask(), has_aux=True))(params, batch)
    np.testing.assert_array_equal(info.aux["positives"], batch[1].sum(axis=1))
    np.testing.assert_array_equal(info.aux["first"], batch[0][:, 0])


def test_per_example_masking_treats_each_example_as_an_environment():
    combiner = gradand.AndMask(threshold=0.6)
    params = init_params()
    x, y = make_batch()
    x, y = x.reshape(-1, D), y.reshape(-1)  # 40 examples, no environment structure

    def example_loss(p, example):
        xi, yi = example
        return loss_fn(p, (xi[None], yi[None]))

    (_, info), grads = jax.jit(gj.value_and_grad(example_loss, combiner))(params, (x, y))
    _, expected, fraction = core_reference(params, (x[:, None], y[:, None]), combiner)
    assert_tree_close(grads, expected, rtol=1e-4, atol=1e-6)
    assert info.losses.shape == (40,)
    assert_tree_close(fractions(info), fraction, rtol=0, atol=1e-6)


def test_argnums_in_axes_and_keyword_arguments_follow_jax_conventions():
    params, (x, y) = init_params(), make_batch()

    def loss_split(hidden, out, batch, *, scale):
        return scale * loss_fn({"hidden": hidden, "out": out}, batch)

    combiner = gradand.AndMask(threshold=0.5)
    f = gj.value_and_grad(loss_split, combiner, argnums=(0, 1), in_axes=(None, None, 1))
    batch_env_axis_1 = (jnp.swapaxes(x, 0, 1), jnp.swapaxes(y, 0, 1))
    (loss, _), (g_hidden, g_out) = jax.jit(f, static_argnames="scale")(
        params["hidden"], params["out"], batch_env_axis_1, scale=2.0
    )
    reference = gj.value_and_grad(lambda p, b: 2.0 * loss_fn(p, b), combiner)
    (expected_loss, _), expected = reference(params, (x, y))
    assert_tree_close({"hidden": g_hidden, "out": g_out}, expected, rtol=1e-5)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_params_get_half_precision_grads_from_float32_statistics(dtype):
    combiner = gradand.AndMask(threshold=0.5)
    params, batch = init_params(dtype=getattr(jnp, dtype)), make_batch()
    batch = jax.tree.map(lambda b: b.astype(dtype), batch)
    (loss, info), grads = jax.jit(gj.value_and_grad(loss_fn, combiner))(params, batch)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(dtype)}
    assert loss.dtype == jnp.dtype(dtype)
    _, expected, fraction = core_reference(params, batch, combiner)
    assert_tree_close(grads, expected, rtol=2e-2, atol=2e-2)
    assert_tree_close(fractions(info), fraction, rtol=0, atol=0.1)


def test_integer_parameter_leaf_is_rejected_at_trace_time():
    params = {**init_params(), "steps": jnp.zeros((), jnp.int32)}
    f = jax.jit(gj.value_and_grad(lambda p, b: loss_fn(p, b), gradand.AndMask()))
    with pytest.raises(TypeError, match=r"args\[0\]\['steps'\] has dtype int32"):
        f(params, make_batch())


def test_batch_without_environment_axis_is_rejected_naming_the_leaf():
    x, _ = make_batch()
    f = jax.jit(gj.value_and_grad(lambda p, b: loss_fn(p, b), gradand.AndMask()))
    with pytest.raises(ValueError, match=r"args\[1\]\[1\] has shape \(\) and no environment axis 0"):
        f(init_params(), (x, jnp.float32(1.0)))


def test_environment_axis_of_different_lengths_is_rejected():
    x, y = make_batch()
    f = jax.jit(gj.value_and_grad(loss_fn, gradand.AndMask()))
    with pytest.raises(ValueError, match=r"args\[1\]\[0\] has 8 environments but args\[1\]\[1\] has 7"):
        f(init_params(), (x, y[:7]))


def test_bad_arguments_are_rejected_with_their_value():
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int"):
        gj.value_and_grad(loss_fn, gradand.AndMask(), chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int"):
        gj.value_and_grad(loss_fn, gradand.AndMask(), chunk_size=2.5)
    with pytest.raises(ValueError, match="method must be one of"):
        gj.value_and_grad(loss_fn, gradand.AndMask(), method="loop")
    with pytest.raises(TypeError, match="combiner must be a gradand combiner"):
        gj.value_and_grad(loss_fn, gradand.AndMask)
    with pytest.raises(TypeError, match="argnums"):
        gj.value_and_grad(loss_fn, gradand.AndMask(), argnums="0")
    params, batch = init_params(), make_batch()
    with pytest.raises(ValueError, match=r"in_axes\[0\]=0, but argument 0 is differentiated"):
        gj.value_and_grad(loss_fn, gradand.AndMask(), in_axes=(0, 0))(params, batch)
    with pytest.raises(ValueError, match="argnums=2 but only 2 positional arguments"):
        gj.value_and_grad(loss_fn, gradand.AndMask(), argnums=2)(params, batch)
    with pytest.raises(ValueError, match="no argument has an environment axis"):
        gj.value_and_grad(lambda p: jnp.sum(p["out"]["w"]), gradand.AndMask())(params)


def test_eager_nan_gradient_is_reported_with_the_parameter_path():
    x, y = make_batch()
    x = x.at[2, 0, 1].set(jnp.nan)
    with pytest.raises(ValueError, match=r"grads\['hidden'\]\['w'\]: grads contains NaN or Inf"):
        gj.value_and_grad(loss_fn, gradand.AndMask())(init_params(), (x, y))


def test_checkify_policy_reports_nan_inside_a_jitted_chunked_step():
    x, y = make_batch()
    f = gj.value_and_grad(loss_fn, gradand.AndMask(), chunk_size=3, nan_policy="checkify")
    step = jax.jit(checkify.checkify(f))
    err, _ = step(init_params(), (x.at[5, 0, 1].set(jnp.inf), y))
    assert "grads['hidden']" in str(err.get()) and "contains NaN or Inf" in str(err.get())
    err, (_, grads) = step(init_params(), (x, y))
    assert err.get() is None and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_flax_linen_params_get_gradients_of_the_same_structure():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.relu(nn.Dense(H)(x)))[..., 0]

    model = MLP()
    x, y = make_batch()
    params = model.init(jax.random.key(0), x[0])["params"]

    def flax_loss(p, batch):
        xb, yb = batch
        logits = model.apply({"params": p}, xb)
        return jnp.mean(jax.nn.softplus(logits) - yb * logits)

    combiner = gradand.AndMask(threshold=0.5)
    (_, _), grads = jax.jit(gj.value_and_grad(flax_loss, combiner))(params, (x, y))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    env_grad = jax.jit(jax.grad(flax_loss))
    per_env = [env_grad(params, (x[e], y[e])) for e in range(ENVS)]
    stacked = jax.tree.map(lambda *g: np.stack([np.asarray(a) for a in g]), *per_env)
    assert_tree_close(grads, jax.tree.map(lambda g: gradand.combine(g, combiner), stacked), rtol=1e-4)


def test_non_array_parameter_leaf_is_rejected_with_advice():
    params = {**init_params(), "activation": jax.nn.relu}
    with pytest.raises(TypeError, match=r"args\[0\]\['activation'\] is a \w+, not an array"):
        gj.value_and_grad(loss_fn, gradand.AndMask())(params, make_batch())
