"""gj.value_and_grad(method="factored"): the same result as method="vectorized", from one pass."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
checkify = pytest.importorskip("jax.experimental.checkify")
nn = pytest.importorskip("flax.linen")

import gradand  # noqa: E402
from gradand.backends import jax as gj  # noqa: E402

ENVS, N, D, H = 6, 5, 3, 8

COMBINERS = {
    "mean": gradand.Mean(),
    "and_mask_1": gradand.AndMask(threshold=1.0),
    "and_mask_05": gradand.AndMask(threshold=0.5, rescale=False),
    "and_mask_0": gradand.AndMask(threshold=0.0),
    "sand_mask": gradand.SandMask(threshold=0.2, k=10.0),
    "geometric_mean": gradand.GeometricMean(threshold=0.5),
}


class MLP(nn.Module):
    """Dense layers (factored) and a LayerNorm (its scale and bias fall back)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(H)(x))
        x = nn.LayerNorm()(nn.Dense(H)(x))
        return nn.Dense(1)(nn.relu(x))[..., 0]


FLAX = MLP()


def flax_loss(params, x, y):
    logits = FLAX.apply({"params": params}, x)
    return jnp.mean(jax.nn.softplus(logits) - y * logits)


def pure_params(seed: int = 0, hidden: int = H) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "l1": {"w": jax.random.normal(k1, (D, hidden)), "b": jnp.full((hidden,), 0.1)},
        "l2": {"w": jax.random.normal(k2, (hidden, hidden)) / 2, "b": jnp.zeros(hidden)},
        "out": {"w": jax.random.normal(k3, (hidden, 1)), "b": jnp.zeros(1)},
        "scale": jnp.asarray(1.5),  # a free parameter: falls back
    }


def pure_loss(params, x, y):
    h = jax.nn.relu(gj.dense(x, params["l1"]["w"], params["l1"]["b"]))
    h = jnp.tanh(gj.dense(h, params["l2"]["w"], params["l2"]["b"]))
    logits = gj.dense(h, params["out"]["w"], params["out"]["b"])[..., 0] * params["scale"]
    return jnp.mean(jax.nn.softplus(logits) - y * logits)


def make_batch(seed: int = 1, envs: int = ENVS, n: int = N):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((envs, n, D)).astype(np.float32)
    rule = rng.standard_normal((envs, 1, D)).astype(np.float32)  # each environment its own shortcut
    y = (np.einsum("end,ekd->en", x, rule) + x[..., 0] > 0).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def flax_params(seed: int = 0):
    return FLAX.init(jax.random.key(seed), jnp.ones((N, D)))["params"]


MODELS = {"flax": (flax_loss, flax_params), "pure": (pure_loss, pure_params)}


def assert_same(got, want, atol=2e-5):
    (loss_a, info_a), grads_a = got
    (loss_b, info_b), grads_b = want
    assert jax.tree.structure(grads_a) == jax.tree.structure(grads_b)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(info_a.losses, info_b.losses, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=atol)
    for a, b in zip(jax.tree.leaves(info_a.infos), jax.tree.leaves(info_b.infos), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(info_a.summary, info_b.summary, atol=1e-6)


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        ("pure", "envs"),
        ("pure", "per_example"),
        ("pure", "per_example_flat"),
        ("flax", "envs"),
        ("flax", "per_example"),
    ],
)
def test_equals_value_and_grad(model, shape):
    loss, init = MODELS[model]
    n = N if shape == "envs" else 1
    x, y = make_batch(envs=ENVS if n > 1 else 16, n=n)
    if shape == "per_example_flat":  # one example per environment, no examples axis
        x, y = x[:, 0], y[:, 0]
    params = init()
    for name, combiner in COMBINERS.items():
        if model == "flax" and name in ("and_mask_0", "and_mask_1"):  # (as the pure model; saves time)
            continue
        want = gj.value_and_grad(loss, combiner)(params, x, y)
        f = gj.value_and_grad(loss, combiner, method="factored")
        # jitted (the statistics accumulated one environment at a time) for one combiner
        got = jax.jit(f)(params, x, y) if name == "and_mask_05" else f(params, x, y)
        assert_same(got, want)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_jit_equals_eager(model):
    loss, init = MODELS[model]
    f = gj.value_and_grad(loss, gradand.AndMask(threshold=0.5), method="factored")
    x, y = make_batch()
    assert_same(f(init(), x, y), jax.jit(f)(init(), x, y), atol=1e-6)


def test_supported_layers_are_factored_and_the_rest_falls_back():
    x, y = make_batch()

    class DenseOnly(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.relu(nn.Dense(H)(x)))[..., 0]

    model = DenseOnly()

    def loss(params, x, y):
        return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    params = model.init(jax.random.key(0), x[0])["params"]
    strict = gj.value_and_grad(loss, gradand.AndMask(), method="factored", fallback="error")
    assert_same(strict(params, x, y), gj.value_and_grad(loss, gradand.AndMask())(params, x, y))
    with pytest.raises(ValueError, match=r"LayerNorm_0.*scale") as err:
        gj.value_and_grad(flax_loss, gradand.AndMask(), method="factored", fallback="error")(
            flax_params(), x, y
        )
    assert "Dense_0" not in str(err.value)
    with pytest.raises(ValueError, match=r"grads\['scale'\]") as err:
        gj.value_and_grad(pure_loss, gradand.AndMask(), method="factored", fallback="error")(
            pure_params(), x, y
        )
    assert "'l1'" not in str(err.value)


def test_batch_norm_within_an_environment_and_unsupported_flax_layers():
    """Environments are vmapped as in value_and_grad: BatchNorm normalises over one environment's
    examples in both. A Dense subclass with its own __call__ and DenseGeneral fall back."""

    class Sub(nn.Dense):
        def __call__(self, x):
            return super().__call__(x) * 2.0

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.BatchNorm(use_running_average=False)(
                nn.Dense(H, use_bias=False)(x)
            )  # (a bias has ~0 grads)
            h = Sub(4)(nn.DenseGeneral(5)(nn.relu(h)))
            return nn.Dense(1)(h)[..., 0]

    net = Net()
    x, y = make_batch()
    variables = net.init(jax.random.key(0), x[0])

    def loss(params, x, y, *, stats):
        out, updates = net.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return jnp.mean((out - y) ** 2), updates

    c = gradand.AndMask(threshold=0.5)
    args = (variables["params"], x, y)
    got = jax.jit(gj.value_and_grad(loss, c, method="factored", has_aux=True))(
        *args, stats=variables["batch_stats"]
    )
    assert_same(got, gj.value_and_grad(loss, c, has_aux=True)(*args, stats=variables["batch_stats"]))
    assert got[0][1].aux["batch_stats"]["BatchNorm_0"]["mean"].shape == (ENVS, H)
    with pytest.raises(ValueError, match="these leaves of params are not") as err:
        gj.value_and_grad(loss, c, method="factored", has_aux=True, fallback="error")(
            *args, stats=variables["batch_stats"]
        )
    for name in ("BatchNorm_0", "DenseGeneral_0", "Sub_0"):
        assert name in str(err.value)
    assert "Dense_0" not in str(err.value) and "Dense_1" not in str(err.value)


def test_a_kernel_also_used_outside_its_layer_falls_back():
    """Weight decay on one kernel: that kernel's gradient is not X'Δ alone, so it falls back."""
    x, y = make_batch()

    def loss(params, x, y):
        return pure_loss(params, x, y) + 0.1 * jnp.sum(params["l2"]["w"] ** 2)

    c = gradand.AndMask(threshold=0.5)
    assert_same(
        jax.jit(gj.value_and_grad(loss, c, method="factored"))(pure_params(), x, y),
        jax.jit(gj.value_and_grad(loss, c))(pure_params(), x, y),
    )
    with pytest.raises(ValueError, match=r"grads\['l2'\]\['w'\]") as err:
        gj.value_and_grad(loss, c, method="factored", fallback="error")(pure_params(), x, y)
    assert "['l2']['b']" not in str(err.value)


@pytest.mark.parametrize("n", [1, N])
def test_a_kernel_shared_by_two_layers_is_factored(n):
    x, y = make_batch(n=n)

    def loss(params, x, y):
        h = jnp.tanh(gj.dense(x, params["w_in"]))
        h = jnp.tanh(gj.dense(h, params["w"], params["b"]))
        h = jnp.tanh(gj.dense(h, params["w"], params["b"]))  # the same kernel and bias again
        return jnp.mean((h.sum(-1) - y) ** 2)

    k1, k2 = jax.random.split(jax.random.key(3))
    params = {"w_in": jax.random.normal(k1, (D, H)), "w": jax.random.normal(k2, (H, H)) / 3, "b": jnp.ones(H)}
    for c in (gradand.AndMask(threshold=0.5), gradand.SandMask(threshold=0.1, k=5.0)):
        want = gj.value_and_grad(loss, c)(params, x, y)
        assert_same(gj.value_and_grad(loss, c, method="factored", fallback="error")(params, x, y), want)


def test_has_aux_and_keyword_arguments():
    x, y = make_batch()

    def loss(params, x, y, *, weight):
        value = weight * pure_loss(params, x, y)
        return value, {"positives": jnp.sum(y), "first": x[0]}

    c = gradand.AndMask(threshold=0.5)
    got = jax.jit(gj.value_and_grad(loss, c, method="factored", has_aux=True))(
        pure_params(), x, y, weight=2.0
    )
    want = gj.value_and_grad(loss, c, has_aux=True)(pure_params(), x, y, weight=2.0)
    assert_same(got, want)
    np.testing.assert_array_equal(got[0][1].aux["first"], x[:, 0])
    assert got[0][1].aux["positives"].shape == (ENVS,)


def test_batch_as_one_pytree_argument_and_float16_inputs():
    x, y = make_batch()

    def loss(params, batch):
        return pure_loss(params, *batch)

    c = gradand.AndMask(threshold=0.5)
    assert_same(
        gj.value_and_grad(loss, c, method="factored")(pure_params(), (x, y)),
        gj.value_and_grad(loss, c)(pure_params(), (x, y)),
    )
    xh = x.astype(jnp.float16)
    got = gj.value_and_grad(loss, c, method="factored")(pure_params(), (xh, y))
    want = gj.value_and_grad(loss, c)(pure_params(), (xh, y))
    assert_same(got, want, atol=1e-3)


def test_bfloat16_flax_dense():
    class Half(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1, dtype=jnp.bfloat16)(nn.tanh(nn.Dense(H, dtype=jnp.bfloat16)(x)))[..., 0]

    model = Half()

    def loss(params, x, y):
        return jnp.mean((model.apply({"params": params}, x).astype(jnp.float32) - y) ** 2)

    x, y = make_batch()
    params = model.init(jax.random.key(0), x[0])["params"]
    c = gradand.AndMask(threshold=0.5, rescale=False)
    (_, _), got = gj.value_and_grad(loss, c, method="factored", fallback="error")(params, x, y)
    (_, _), want = gj.value_and_grad(loss, c)(params, x, y)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("n", [1, N])
def test_nan_policies(n):
    x, y = make_batch(n=n, envs=ENVS)
    bad = x.at[2, 0, 1].set(jnp.nan)
    c = gradand.AndMask(threshold=0.5)
    want = gj.value_and_grad(pure_loss, c, nan_policy="zero")(pure_params(), bad, y)
    got = jax.jit(gj.value_and_grad(pure_loss, c, method="factored", nan_policy="zero"))(
        pure_params(), bad, y
    )
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gj.value_and_grad(pure_loss, c, method="factored")(pure_params(), bad, y)
    step = jax.jit(
        checkify.checkify(gj.value_and_grad(pure_loss, c, method="factored", nan_policy="checkify"))
    )
    err, _ = step(pure_params(), bad, y)
    assert "contains NaN or Inf" in str(err.get())
    err, (_, grads) = step(pure_params(), x, y)
    assert err.get() is None and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_dense_outside_the_transform_is_a_matmul():
    x, w, b = jnp.ones((4, 3)), jnp.arange(6.0).reshape(3, 2), jnp.ones(2)
    np.testing.assert_array_equal(gj.dense(x, w, b), x @ w + b)
    np.testing.assert_array_equal(jax.vmap(gj.dense, in_axes=(0, None))(x[:, None], w), x[:, None] @ w)
    assert jax.grad(lambda w: gj.dense(x, w).sum())(w).shape == (3, 2)


def test_errors():
    x, y = make_batch()
    c = gradand.AndMask()
    params = pure_params()
    with pytest.raises(TypeError, match="combiner"):
        gj.value_and_grad(pure_loss, "and", method="factored")
    with pytest.raises(ValueError, match="fallback"):
        gj.value_and_grad(pure_loss, c, method="factored", fallback="loop")
    with pytest.raises(ValueError, match="nan_policy"):
        gj.value_and_grad(pure_loss, c, method="factored", nan_policy="ignore")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        gj.value_and_grad(None, c, method="factored")
    f = gj.value_and_grad(pure_loss, c, method="factored")
    with pytest.raises(ValueError, match="no batch"):
        f(params)
    with pytest.raises(ValueError, match=r"args\[2\] has 5 environments|has 6 environments but"):
        f(params, x, y[:5])
    with pytest.raises(ValueError, match="0 environments"):
        f(params, x[:0], y[:0])
    with pytest.raises(ValueError, match=r"shape \(\) and no environment axis"):
        f(params, x, jnp.float32(1.0))
    with pytest.raises(TypeError, match="dtype int32"):
        f({**params, "scale": jnp.asarray(1)}, x, y)
    with pytest.raises(TypeError, match="floating inputs"):
        f(params, x.astype(jnp.int32), y)
    with pytest.raises(ValueError, match=r"kernel must have shape \(in, out\)"):
        gj.dense(x, jnp.ones(3))
    with pytest.raises(ValueError, match=r"in = kernel.shape\[0\] = 4"):
        gj.dense(x, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"bias must have shape \(out,\) = \(2,\)"):
        gj.dense(x, jnp.ones((3, 2)), jnp.ones(3))
    with pytest.raises(TypeError, match="must return \\(loss, aux\\)"):
        gj.value_and_grad(pure_loss, c, method="factored", has_aux=True)(params, x, y)


@settings(max_examples=5)
@given(
    envs=st.integers(1, 9),
    n=st.integers(1, 4),
    hidden=st.integers(1, 5),
    threshold=st.floats(0.0, 1.0),
    sand=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_equals_value_and_grad(envs, n, hidden, threshold, sand, seed):
    x, y = make_batch(seed=seed, envs=envs, n=n)
    params = pure_params(seed, hidden)
    c = gradand.SandMask(threshold=threshold, k=3.0) if sand else gradand.AndMask(threshold=threshold)
    want = jax.jit(gj.value_and_grad(pure_loss, c))(params, x, y)  # jit: fewer compilations than eager
    got = jax.jit(gj.value_and_grad(pure_loss, c, method="factored"))(params, x, y)
    (_, _), g_want = want
    (_, _), g_got = got
    # a component whose environments' gradients are zero up to rounding may flip its vote
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        close = np.isclose(a, b, rtol=1e-4, atol=1e-5)
        assert close.mean() >= 0.95 or (a.size < 4 and close.all()), (a, b)


def test_environments_in_cache_sized_chunks_with_a_remainder(monkeypatch):
    """Many environments: a 260 x 260 kernel's statistics come in chunks of 7 on CPU: 9 = 7 + 2."""
    from gradand.backends.jax import _factored, _tree

    x, y = make_batch(envs=9, n=2)
    params = jax.tree.map(lambda a: a / 5, pure_params(4, hidden=260))
    # on CPU: batched products of chunks that stay in cache, each summed one environment at a
    # time (up to 256 environments), or reduced over the chunk's axis (beyond)
    assert _factored._chunk_size(params["l2"]["w"], 9) == 7 or jax.default_backend() != "cpu"
    monkeypatch.setattr(_tree, "_UNROLL_ENVIRONMENTS", 0)  # as for more than 256 environments
    for c in (gradand.AndMask(threshold=0.5),):
        chunked = jax.jit(gj.value_and_grad(pure_loss, c, method="factored"))(params, x, y)
        with monkeypatch.context() as m:
            m.setattr(_factored, "_CHUNK_BYTES", 2**40)
            whole = jax.jit(gj.value_and_grad(pure_loss, c, method="factored"))(params, x, y)
        assert_same(chunked, whole, atol=1e-5)
        # against value_and_grad: a few per-environment gradients cancel to ~0, and their sign
        # (so the vote at the 0.5 boundary) depends on rounding
        (_, _), want = gj.value_and_grad(pure_loss, c)(params, x, y)
        for a, b in zip(jax.tree.leaves(chunked[1]), jax.tree.leaves(want), strict=True):
            assert np.isclose(a, b, rtol=1e-4, atol=1e-4).mean() > 0.99


def test_inputs_with_several_leading_axes():
    """(E, n, positions, features): a dense layer's rows are all of an environment's positions."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((ENVS, 3, 4, D)).astype(np.float32))
    y = jnp.asarray(rng.standard_normal((ENVS, 3)).astype(np.float32))

    def loss(params, x, y):
        h = jnp.tanh(gj.dense(x, params["l1"]["w"], params["l1"]["b"])).mean(-2)  # (n, H)
        return jnp.mean((gj.dense(h, params["out"]["w"], params["out"]["b"])[..., 0] - y) ** 2)

    params = {k: v for k, v in pure_params(2).items() if k in ("l1", "out")}
    c = gradand.AndMask(threshold=0.5)
    got = gj.value_and_grad(loss, c, method="factored", fallback="error")(params, x, y)
    assert_same(got, gj.value_and_grad(loss, c)(params, x, y))


def test_several_cache_sized_chunks_are_scanned_and_equal_one_product(monkeypatch):
    """20 environments of a 260 x 260 kernel on CPU: chunks of 7 (2 in a scan, then 6 more)."""
    from gradand.backends.jax import _factored

    x, y = make_batch(envs=20, n=2)
    params = jax.tree.map(lambda a: a / 5, pure_params(4, hidden=260))
    assert _factored._chunk_size(params["l2"]["w"], 20) == 7 or jax.default_backend() != "cpu"
    monkeypatch.setattr(_factored, "_SCAN_CHUNKS", 2)  # scan from 2 chunks (default: from 4)
    for c in (gradand.AndMask(threshold=0.5), gradand.SandMask(threshold=0.5, k=3.0)):
        chunked = jax.jit(gj.value_and_grad(pure_loss, c, method="factored"))(params, x, y)
        with monkeypatch.context() as m:
            m.setattr(_factored, "_CHUNK_BYTES", 2**40)
            whole = jax.jit(gj.value_and_grad(pure_loss, c, method="factored"))(params, x, y)
        assert_same(chunked, whole, atol=1e-5)


# --- convolutions ---------------------------------------------------------------------------
#
# Oracle: each environment's own gradient (jax.grad of its loss, one environment at a time),
# combined by the numpy core. float64 (jax.enable_x64), so that no vote flips on rounding.

CONV_COMBINERS = [gradand.AndMask(threshold=0.7), gradand.SandMask(threshold=0.3, k=2.0)]


def conv_params(dims: int, seed: int = 0) -> dict:
    """Two convolutions (the second grouped, strided, dilated) and a dense head, float64."""
    rng = np.random.default_rng(seed)
    first, second = ((3, 3), (3, 2)) if dims == 2 else ((3,), (2,))
    flat = {2: 4 * 4 * 4, 1: 11 * 4}[dims]  # the second convolution's output, flattened
    return {
        "c1": {"k": rng.standard_normal((*first, 2, 4)) / 2, "b": np.full(4, 0.1)},
        "c2": {"k": rng.standard_normal((*second, 2, 4)) / 2, "b": np.zeros(4)},
        "out": {"w": rng.standard_normal((flat, 3)) / 4, "b": np.zeros(3)},
    }


def conv_loss(dims: int):
    """One environment's cross-entropy through gj.conv: SAME then strided, dilated, grouped."""
    second = (
        {"strides": 2, "kernel_dilation": (1, 2), "padding": ((1, 1), (0, 0))}
        if dims == 2
        else {"strides": 1, "kernel_dilation": 2, "padding": "VALID", "input_dilation": 2}
    )

    def loss(params, x, y):
        h = jax.nn.relu(gj.conv(x, params["c1"]["k"], params["c1"]["b"], padding="SAME"))
        h = jnp.tanh(gj.conv(h, params["c2"]["k"], params["c2"]["b"], feature_group_count=2, **second))
        flat = h.reshape(*h.shape[: h.ndim - dims - 1], -1)
        logits = gj.dense(flat, params["out"]["w"], params["out"]["b"])
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[..., None], -1)[..., 0])

    return loss


def conv_batch(dims: int, envs: int, n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    size = {2: (8, 9), 1: (7,)}[dims]
    return jnp.asarray(rng.standard_normal((envs, n, *size, 2))), jnp.asarray(rng.integers(0, 3, (envs, n)))


def oracle(loss, params, combiner, x, y):
    """Each environment's own jax.grad, combined by the numpy core."""
    grad = jax.jit(jax.grad(loss))
    per_env = [grad(params, x[e], y[e]) for e in range(x.shape[0])]
    return jax.tree.map(lambda *g: gradand.combine(np.stack([np.asarray(a) for a in g]), combiner), *per_env)


def assert_tree_close(got, want, rtol=1e-9, atol=1e-12):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    ("dims", "n", "combiner"),
    [
        (1, 1, CONV_COMBINERS[0]),
        (1, 5, CONV_COMBINERS[1]),
        (2, 1, CONV_COMBINERS[1]),
        (2, 5, CONV_COMBINERS[0]),
    ],
    ids=["1d-n1", "1d-n5", "2d-n1", "2d-n5"],
)
def test_conv_kernels_equal_each_environments_own_gradient_combined(dims, n, combiner):
    """Strides, SAME / explicit / VALID padding, kernel and input dilation, groups; under jit,
    in chunks of 2 environments (2 + 2 + 1), every leaf factored (fallback="error")."""
    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, conv_params(dims))
        x, y = conv_batch(dims, 5, n)
        loss = conv_loss(dims)
        f = gj.value_and_grad(loss, combiner, method="factored", fallback="error", chunk_size=2)
        (_, result), grads = jax.jit(f)(params, x, y)
        assert_tree_close(grads, oracle(loss, params, combiner, x, y))
        assert jax.tree.leaves(grads)[0].dtype == jnp.float64
        assert float(result.summary.survivor_fraction) < 1.0  # the environments disagree somewhere


def test_conv_eager_and_vmapped_transposes_equal_the_per_environment_ones(monkeypatch):
    """The kernel gradients one per environment (jit on CPU) or vmapped (environments as feature
    groups: accelerators, or eagerly past the unroll limit) agree, eagerly and under jit."""
    from gradand.backends.jax import _tree

    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, conv_params(1))
        x, y = conv_batch(1, 4, 3)
        c = gradand.AndMask(threshold=0.5)
        want = oracle(conv_loss(1), params, c, x, y)
        f = gj.value_and_grad(conv_loss(1), c, method="factored", fallback="error")
        assert_tree_close(f(params, x, y)[1], want)
        monkeypatch.setattr(_tree, "_UNROLL_ENVIRONMENTS", 0)  # as for more than 256 environments
        assert_tree_close(jax.jit(f)(params, x, y)[1], want)


def test_conv_statistics_in_many_cache_sized_chunks_are_not_scanned(monkeypatch):
    """Chunks of 2 of 9 environments with the scan threshold at 2 chunks: a convolution's kernel
    stays unrolled (XLA on CPU runs its transpose 50-80x slower in a loop); the dense head's
    kernel is scanned. Both equal one chunk."""
    from gradand.backends.jax import _factored

    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, conv_params(1))
        x, y = conv_batch(1, 9, 2)
        c = gradand.AndMask(threshold=0.5)

        def step():  # a new function: jit's cache holds traces by function
            return jax.jit(gj.value_and_grad(conv_loss(1), c, method="factored", fallback="error"))

        whole = step()(params, x, y)
        monkeypatch.setattr(_factored, "_SCAN_CHUNKS", 2)
        monkeypatch.setattr(_factored, "_CHUNK_BYTES", 2 * 8 * 3 * 2 * 4)  # 2 environments of c1's kernel
        jaxpr = str(step().trace(params, x, y).jaxpr)
        assert jaxpr.count("scan[") == 1  # the dense head's kernel; no convolution in a loop
        chunked = step()(params, x, y)
        assert_tree_close(chunked[1], whole[1], rtol=1e-12, atol=1e-12)


def test_conv_with_env_ids_of_different_sizes_equals_the_vectorized_path():
    """Environments of 1, 4 and 2 examples; loss_fn is one example's loss (an unbatched image)."""
    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, conv_params(2))
        x, y = conv_batch(2, 7, 1)
        x, y = x[:, 0], y[:, 0]  # 7 examples
        ids = jnp.asarray([1, 0, 1, 2, 1, 1, 2])
        c = gradand.AndMask(threshold=0.6)
        want = jax.jit(gj.value_and_grad(conv_loss(2), c, num_envs=3))(params, x, y, env_ids=ids)
        f = gj.value_and_grad(conv_loss(2), c, method="factored", fallback="error", num_envs=3)
        got = jax.jit(f)(params, x, y, env_ids=ids)  # each environment padded to the 7 examples
        assert_tree_close(got[1], want[1])
        np.testing.assert_allclose(got[0][1].losses, want[0][1].losses, rtol=1e-12)


class FlaxConvNet(nn.Module):
    """flax convolutions of every supported kind, and three that fall back."""

    unsupported: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="CIRCULAR")(x))
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, kernel_dilation=(2, 1), feature_group_count=2)(x))
        x = nn.tanh(nn.Conv(3, (2, 2), padding=((1, 0), (0, 1)), input_dilation=2, use_bias=False)(x))
        if self.unsupported:
            x = nn.ConvTranspose(3, (2, 2))(x)
            x = nn.Conv(3, (1, 1), mask=jnp.ones((1, 1, 3, 3)))(x)
            x = DoubledConv(3, (1, 1))(x)
        x = x.reshape(*x.shape[:-3], -1)
        return nn.Dense(1)(x)[..., 0]


class DoubledConv(nn.Conv):
    def __call__(self, x):
        return super().__call__(x) * 2.0


def test_flax_conv_is_intercepted_and_equals_the_vectorized_path():
    net = FlaxConvNet()
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((ENVS, 3, 8, 8, 2)).astype(np.float32))
    y = jnp.asarray(rng.standard_normal((ENVS, 3)).astype(np.float32))
    params = net.init(jax.random.key(0), x[0])["params"]

    def loss(params, x, y):
        return jnp.mean((net.apply({"params": params}, x) - y) ** 2)

    c = gradand.AndMask(threshold=0.5)
    got = jax.jit(gj.value_and_grad(loss, c, method="factored", fallback="error"))(params, x, y)
    assert_same(got, jax.jit(gj.value_and_grad(loss, c))(params, x, y), atol=1e-5)

    odd = FlaxConvNet(unsupported=True)
    odd_params = odd.init(jax.random.key(0), x[0])["params"]

    def odd_loss(params, x, y):
        return jnp.mean((odd.apply({"params": params}, x) - y) ** 2)

    with pytest.raises(ValueError, match="these leaves of params are not") as err:
        gj.value_and_grad(odd_loss, c, method="factored", fallback="error")(odd_params, x, y)
    for name in ("ConvTranspose_0", "Conv_3", "DoubledConv_0"):
        assert name in str(err.value)
    for name in ("Conv_0", "Conv_1", "Conv_2", "Dense_0"):
        assert f"'{name}'" not in str(err.value)
    got = jax.jit(gj.value_and_grad(odd_loss, c, method="factored"))(odd_params, x, y)
    assert_same(got, jax.jit(gj.value_and_grad(odd_loss, c))(odd_params, x, y), atol=1e-5)


class BatchNormConvNet(nn.Module):
    """The MNIST-style convnet with BatchNorm after each convolution, in train mode (no conv bias:
    BatchNorm subtracts it, so its gradient is 0 up to rounding, and its votes are noise)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Conv(8, (3, 3), use_bias=False)(x)))
        x = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Conv(8, (3, 3), strides=2, use_bias=False)(x)))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(3)(x.reshape(*x.shape[:-3], -1))


def test_flax_convnet_with_batch_norm_has_per_environment_batch_statistics():
    """Each environment is normalised with its own batch statistics, as by the vectorized path
    and as if the model ran on that environment alone; batch_stats come back per environment."""
    net = BatchNormConvNet()
    rng = np.random.default_rng(7)
    shift = np.arange(4, dtype=np.float32)[:, None, None, None, None]  # environments differ in mean
    x = jnp.asarray(rng.standard_normal((4, 6, 10, 10, 1)).astype(np.float32) + shift)
    y = jnp.asarray(rng.integers(0, 3, (4, 6)))
    variables = net.init(jax.random.key(0), x[0])

    def loss(params, x, y, *, stats):
        logits, updates = net.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        value = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[..., None], -1)[..., 0])
        return value, updates["batch_stats"]

    c = gradand.AndMask(threshold=0.5)
    args, stats = (variables["params"], x, y), variables["batch_stats"]
    got = jax.jit(gj.value_and_grad(loss, c, method="factored", has_aux=True))(*args, stats=stats)
    want = jax.jit(gj.value_and_grad(loss, c, has_aux=True))(*args, stats=stats)
    assert_same(got, want, atol=1e-5)
    per_env = got[0][1].aux
    for e in range(4):  # environment e's batch statistics are those of a forward pass over it alone
        alone = loss(variables["params"], x[e], y[e], stats=stats)[1]
        for a, b in zip(jax.tree.leaves(per_env), jax.tree.leaves(alone), strict=True):
            np.testing.assert_allclose(a[e], b, rtol=1e-5, atol=1e-6)
    mean = per_env["BatchNorm_0"]["mean"]
    assert mean.shape == (4, 8) and float(jnp.ptp(mean, axis=0).max()) > 1e-2  # not pooled over environments
    with pytest.raises(ValueError, match="these leaves of params are not") as err:  # γ, β fall back
        gj.value_and_grad(loss, c, method="factored", has_aux=True, fallback="error")(*args, stats=stats)
    assert "BatchNorm_0" in str(err.value) and "'Conv_0'" not in str(err.value)


def test_conv_outside_the_transform_is_lax_conv_general_dilated():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((2, 6, 7, 4)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((3, 2, 2, 6)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal(6).astype(np.float32))
    want = jax.lax.conv_general_dilated(
        x, k, (2, 1), ((1, 1), (0, 2)), rhs_dilation=(1, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=2,
    ) + b  # fmt: skip
    options = {"strides": (2, 1), "padding": (1, (0, 2)), "kernel_dilation": (1, 2), "feature_group_count": 2}
    np.testing.assert_allclose(gj.conv(x, k, b, **options), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gj.conv(x[0], k, b, **options), want[0], rtol=1e-6, atol=1e-6)  # one example
    assert gj.conv(x[None], k, feature_group_count=2).shape == (1, 2, 6, 7, 6)  # two batch axes, SAME
    grad = jax.grad(lambda k: gj.conv(x, k, feature_group_count=2).sum())(k)
    assert grad.shape == k.shape
    assert gj.conv(x.astype(jnp.bfloat16), k, feature_group_count=2).dtype == jnp.float32  # promoted


def test_conv_errors():
    x, k = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 4, 6))
    with pytest.raises(ValueError, match=r"kernel must have shape \(\*window, in / groups, out\)"):
        gj.conv(x, jnp.ones((4, 6)))
    with pytest.raises(ValueError, match=r"in = kernel.shape\[-2\] \* feature_group_count = 8"):
        gj.conv(x, k, feature_group_count=2)
    with pytest.raises(ValueError, match=r"feature_group_count must be a positive int dividing .* 6"):
        gj.conv(x, k, feature_group_count=4)
    with pytest.raises(ValueError, match="2 spatial dimensions"):
        gj.conv(jnp.ones((6, 4)), k)
    with pytest.raises(ValueError, match=r"bias must have shape \(out,\) = \(6,\)"):
        gj.conv(x, k, jnp.ones(4))
    with pytest.raises(ValueError, match="strides must be a positive int or 2 positive ints; got"):
        gj.conv(x, k, strides=(1, 0))
    with pytest.raises(ValueError, match="kernel_dilation must be"):
        gj.conv(x, k, kernel_dilation=(1, 1, 1))
    with pytest.raises(ValueError, match="padding must be 'SAME', 'VALID'"):
        gj.conv(x, k, padding="CIRCULAR")
    with pytest.raises(ValueError, match=r"or 2 ints or \(low, high\) pairs; got \(1, 2, 3\)"):
        gj.conv(x, k, padding=(1, 2, 3))
    with pytest.raises(TypeError, match="conv needs floating inputs"):
        gj.conv(x.astype(jnp.int32), k)
