"""gradand.backends.jax: pytree statistics / finalize / combine against the numpy core."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
checkify = pytest.importorskip("jax.experimental.checkify")

import gradand  # noqa: E402
from gradand.backends import jax as gj  # noqa: E402

COMBINERS = {
    "mean": gradand.Mean(),
    "and_mask": gradand.AndMask(threshold=0.6),
    "and_mask_strict_no_rescale": gradand.AndMask(threshold=1.0, rescale=False),
    "geometric_mean": gradand.GeometricMean(threshold=0.5),
    "sand_mask": gradand.SandMask(threshold=0.3, k=10.0),
}


def numpy_grads(seed: int = 0, envs: int = 6) -> dict:
    """Per-environment gradients with a shared component (agreement) plus noise (disagreement)."""
    rng = np.random.default_rng(seed)

    def leaf(*shape: int) -> np.ndarray:
        shared = rng.standard_normal(shape)
        return (shared + 1.5 * rng.standard_normal((envs, *shape))).astype(np.float32)

    return {"dense": {"w": leaf(3, 4), "b": leaf(4)}, "scale": leaf(), "conv": [leaf(2, 2, 3)]}


def to_jax(tree: dict, dtype=None) -> dict:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), tree)


def core(tree: dict, combiner: gradand.Combiner) -> tuple[dict, dict, dict]:
    """The numpy core, leaf by leaf: the oracle."""
    out = jax.tree.map(lambda g: gradand.combine(g, combiner, return_info=True), tree)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], gradand.MaskInfo)  # noqa: E731
    update = jax.tree.map(lambda p: p[0], out, is_leaf=is_pair)
    fraction = jax.tree.map(lambda p: float(p[1].survivor_fraction), out, is_leaf=is_pair)
    agreement = jax.tree.map(lambda p: float(p[1].agreement), out, is_leaf=is_pair)
    return update, fraction, agreement


def assert_tree_close(actual, expected, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(e), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(COMBINERS))
def test_tree_combine_equals_numpy_core_on_every_leaf(name):
    combiner = COMBINERS[name]
    grads = numpy_grads()
    update, info = jax.jit(lambda g: gj.combine(g, combiner, return_info=True))(to_jax(grads))
    expected, fraction, agreement = core(grads, combiner)
    assert_tree_close(update, expected)
    assert_tree_close(info.survivor_fraction, fraction)
    assert_tree_close(info.agreement, agreement)
    # The mask did something for the masking combiners (the test data has disagreement).
    if name != "mean":
        assert min(jax.tree.leaves(fraction)) < 1.0


@pytest.mark.parametrize("name", ["and_mask", "sand_mask"])
def test_jit_and_eager_give_the_same_update(name):
    combiner = COMBINERS[name]
    grads = to_jax(numpy_grads(seed=1))
    eager = gj.combine(grads, combiner, return_info=True)
    jitted = jax.jit(lambda g: gj.combine(g, combiner, return_info=True))(grads)
    assert_tree_close(jitted, eager)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_gradients_keep_their_dtype_with_float32_statistics(dtype):
    combiner = gradand.AndMask(threshold=0.6)
    grads = to_jax(numpy_grads(seed=2), dtype=getattr(jnp, dtype))
    stats = gj.statistics(grads, combiner)
    leaves = jax.tree.leaves(stats, is_leaf=lambda x: isinstance(x, gradand.Statistics))
    assert {s.mean.dtype for s in leaves} == {jnp.dtype("float32")}
    update = jax.jit(lambda g: gj.combine(g, combiner))(grads)
    assert {x.dtype for x in jax.tree.leaves(update)} == {jnp.dtype(dtype)}
    # Oracle: the core on the same (rounded) values in float32, rounded back.
    exact = jax.tree.map(lambda g: np.asarray(g, dtype=np.float32), grads)
    expected, _, _ = core(exact, combiner)
    expected = jax.tree.map(lambda e: np.asarray(jnp.asarray(e, dtype=dtype), dtype=np.float64), expected)
    assert_tree_close(update, expected, rtol=0, atol=0)


def test_statistics_pytree_folds_through_lax_scan_like_merging():
    """Statistics are a pytree: a scan over environments that merges them equals the dense reduction."""
    combiner = gradand.GeometricMean(threshold=0.5)
    grads = to_jax(numpy_grads(seed=3, envs=5))
    zero = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(lambda g: gj.statistics(jax.tree.map(lambda x: x[:1], g), combiner), grads),
    )

    def body(carry, one_env):
        part = gj.statistics(jax.tree.map(lambda x: x[None], one_env), combiner)
        merged = jax.tree.map(gradand.merge, carry, part, is_leaf=lambda x: isinstance(x, gradand.Statistics))
        return merged, None

    folded, _ = jax.lax.scan(body, zero, grads)
    leaf = folded["dense"]["w"]
    assert isinstance(leaf, gradand.Statistics) and int(leaf.count) == 5 and leaf.eps == combiner.eps
    assert_tree_close(gj.finalize(folded, combiner), gj.combine(grads, combiner), rtol=1e-5)


def test_microbatch_statistics_merged_equal_all_environments_at_once():
    combiner = gradand.AndMask(threshold=0.6)
    grads = to_jax(numpy_grads(seed=4, envs=6))
    first = gj.statistics(jax.tree.map(lambda x: x[:2], grads), combiner)
    second = gj.statistics(jax.tree.map(lambda x: x[2:], grads), combiner)
    merged = jax.tree.map(gradand.merge, first, second, is_leaf=lambda x: isinstance(x, gradand.Statistics))
    assert_tree_close(jax.jit(gj.finalize, static_argnums=1)(merged, combiner), gj.combine(grads, combiner))


def test_axis_name_psum_gives_every_shard_the_update_of_all_environments():
    """Split 6 environments over 3 'devices' (vmap with an axis name): same update as dense, on each."""
    combiner = gradand.SandMask(threshold=0.3, k=10.0)
    grads = to_jax(numpy_grads(seed=5, envs=6))
    shards = jax.tree.map(lambda x: x.reshape((3, 2, *x.shape[1:])), grads)
    combine = jax.vmap(lambda g: gj.combine(g, combiner, axis_name="devices"), axis_name="devices")
    per_device = jax.jit(combine)(shards)
    dense = jax.jit(lambda g: gj.combine(g, combiner))(grads)
    for device in range(3):
        assert_tree_close(jax.tree.map(lambda x, d=device: x[d], per_device), dense, rtol=1e-5)


def test_update_stays_on_the_gradients_device():
    device = jax.devices()[-1]
    grads = jax.device_put({"w": jnp.ones((3, 2))}, device)
    update = gj.combine(grads, gradand.AndMask())
    assert all(x.devices() == {device} for x in jax.tree.leaves(update))


def test_leaf_without_environment_axis_is_rejected_naming_the_leaf():
    grads = {"w": jnp.ones((3, 2)), "b": jnp.float32(1.0)}
    with pytest.raises(ValueError, match=r"grads\['b'\] has shape \(\) and so no environment axis"):
        gj.combine(grads, gradand.AndMask())


def test_environment_axis_of_different_lengths_is_rejected_at_trace_time():
    grads = {"a": jnp.ones((4, 2)), "b": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match=r"grads\['a'\] has 4 environments but grads\['b'\] has 3"):
        jax.jit(lambda g: gj.combine(g, gradand.Mean()))(grads)


def test_integer_leaf_is_rejected_at_trace_time():
    grads = {"w": jnp.ones((2, 3)), "step": jnp.ones((2,), dtype=jnp.int32)}
    with pytest.raises(TypeError, match=r"grads\['step'\] has dtype int32"):
        jax.jit(lambda g: gj.combine(g, gradand.AndMask()))(grads)


def test_empty_tree_and_non_combiner_are_rejected():
    with pytest.raises(ValueError, match="no array leaves"):
        gj.combine({}, gradand.AndMask())
    with pytest.raises(TypeError, match="combiner must be a gradand combiner"):
        gj.combine({"w": jnp.ones((2, 2))}, "and_mask")
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        gj.combine({"w": jnp.ones((2, 2))}, gradand.AndMask(), nan_policy="ignore")


def test_eager_nan_is_reported_with_the_leaf_path():
    grads = {"layer": {"w": jnp.array([[1.0, jnp.nan], [1.0, 2.0]])}}
    with pytest.raises(ValueError, match=r"grads\['layer'\]\['w'\]: grads contains NaN or Inf"):
        gj.combine(grads, gradand.AndMask())


def test_nan_policy_zero_under_jit_matches_the_core():
    g = np.array([[1.0, np.nan, -1.0], [2.0, 1.0, np.inf], [1.0, 3.0, 2.0]], dtype=np.float32)
    combiner = gradand.AndMask(threshold=0.6)
    update = jax.jit(lambda x: gj.combine({"w": x}, combiner, nan_policy="zero"))(jnp.asarray(g))
    np.testing.assert_allclose(update["w"], gradand.combine(g, combiner, nan_policy="zero"), rtol=1e-6)
    assert np.all(np.isfinite(update["w"]))


def test_checkify_policy_reports_a_non_finite_leaf_under_jit():
    combiner = gradand.AndMask()
    step = jax.jit(checkify.checkify(lambda g: gj.combine(g, combiner, nan_policy="checkify")))
    err, _ = step({"ok": jnp.ones((2, 2)), "bad": jnp.array([[1.0, jnp.inf], [1.0, 1.0]])})
    assert "grads['bad'] contains NaN or Inf (1 of 4 entries" in str(err.get())
    err, update = step({"ok": jnp.ones((2, 2)), "bad": jnp.ones((2, 2))})
    assert err.get() is None and float(update["bad"][0]) == 1.0
