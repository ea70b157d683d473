"""The core is array-API generic: same results, namespace, dtype and device for every array library."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import combiners, stacked_grads, with_specials

import gradand

COMBINERS = [
    gradand.Mean(),
    gradand.AndMask(0.7),
    gradand.AndMask(1.0, rescale=False),
    gradand.GeometricMean(0.5),
    gradand.SandMask(0.4, k=10.0),
]


def _strict():
    return pytest.importorskip("array_api_strict")


def _torch():
    return pytest.importorskip("torch")


def _jnp():
    pytest.importorskip("jax")
    import jax.numpy as jnp  # float32 by default: x64 stays off (other tests rely on it)

    return jnp


def _to(name, g):
    if name == "numpy":
        return g
    if name == "array_api_strict":
        return _strict().asarray(g)
    if name == "torch":
        return _torch().from_numpy(g.copy())
    return _jnp().asarray(g)


def _back(x):
    return np.asarray(x) if not hasattr(x, "__dlpack__") or isinstance(x, np.ndarray) else np.from_dlpack(x)


NAMESPACES = ["numpy", "array_api_strict", "torch", "jax"]


@pytest.mark.parametrize("name", NAMESPACES)
@pytest.mark.parametrize("combiner", COMBINERS, ids=repr)
def test_results_equal_the_numpy_core_in_every_namespace(name, combiner):
    g = np.random.default_rng(1).standard_normal((5, 3, 4)) + 0.3
    if name == "jax":
        g = g.astype(np.float32)
    x = _to(name, g)
    out, info = gradand.combine(x, combiner, return_info=True)
    assert type(out) is type(x)
    assert out.dtype == x.dtype
    assert tuple(out.shape) == (3, 4)
    ref, ref_info = gradand.combine(g, combiner, return_info=True)
    tol = 1e-5 if g.dtype == np.float32 else 1e-10
    np.testing.assert_allclose(_back(out), ref, rtol=tol, atol=tol * 1e-4)
    np.testing.assert_allclose(float(info.survivor_fraction), float(ref_info.survivor_fraction), rtol=tol)
    np.testing.assert_allclose(float(info.agreement), float(ref_info.agreement), rtol=tol)


@pytest.mark.parametrize("name", NAMESPACES)
def test_streaming_and_merge_work_in_every_namespace(name):
    g = np.random.default_rng(2).standard_normal((6, 7)).astype(np.float32)
    x = _to(name, g)
    c = gradand.SandMask(0.3, k=5.0)
    stats = gradand.Statistics()
    for e in range(6):
        stats = stats + gradand.statistics(x[e, ...], c, axis=None)
    merged = gradand.merge(gradand.statistics(x[:2, ...], c), gradand.statistics(x[2:, ...], c))
    for s in (stats, merged):
        np.testing.assert_allclose(_back(gradand.finalize(s, c)), gradand.combine(g, c), rtol=1e-5)


@settings(max_examples=25)
@given(stacked_grads(max_envs=5), combiners())
def test_array_api_strict_agrees_with_numpy_on_random_inputs(g, combiner):
    xp = _strict()
    out = gradand.combine(xp.asarray(g), combiner)
    np.testing.assert_allclose(np.asarray(out), gradand.combine(g, combiner), rtol=1e-9, atol=1e-300)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["float32", "float64", "float16", "bfloat16"]))
def test_torch_select_hook_is_where_mask_d_d_minus_d(seed, dtype):
    """The torch namespace's ``gradand_select`` (a product, not ``torch.where``) selects exactly like the
    core's ``where(mask, d, d - d)``: kept values bit for bit, masked +0, NaN and ±Inf NaN either way."""
    torch = _torch()
    from gradand.backends.torch._common import XP

    rng = np.random.default_rng(seed)
    d = with_specials(rng, 300)
    t = torch.from_numpy(d).to(getattr(torch, dtype))
    mask = torch.from_numpy(rng.random(300) < 0.5)
    got, want = XP.gradand_select(mask, t), torch.where(mask, t, t - t)
    assert got.dtype == t.dtype
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    both = ~torch.isnan(want)
    assert torch.equal(got[both], want[both])
    assert not torch.signbit(got[~mask & both]).any()  # masked: +0, never -0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["float32", "float16", "bfloat16"]), st.booleans())
def test_jax_vote_hook_is_sign_with_nan_casting_no_vote(seed, dtype, jitted):
    """The JAX namespace's ``gradand_vote_signs`` (``copysign(|g| > 0, g)``, no ``where``) is
    ``sign(g)`` with NaN mapped to 0: ±1 for ±Inf, 0 for ±0, eagerly and under ``jit``."""
    _jnp()
    import jax
    import jax.numpy as jnp

    from gradand.backends.jax._tree import XP

    rng = np.random.default_rng(seed)
    d = with_specials(rng, 300, decades=3)
    g = jnp.asarray(d, dtype=getattr(jnp, dtype))
    votes = jax.jit(XP.gradand_vote_signs) if jitted else XP.gradand_vote_signs
    got = np.asarray(votes(g), dtype=np.float64)
    want = np.nan_to_num(np.sign(np.asarray(g, dtype=np.float64)), nan=0.0)
    np.testing.assert_array_equal(got, want)
    assert votes(g).dtype == g.dtype


def test_jax_jitted_statistics_count_the_other_votes_of_a_nan_component():
    """Under ``jit`` (where "raise" cannot look at values) a NaN gradient casts no vote and the
    other environments' votes on its component still count, as in the numpy core."""
    _jnp()
    import jax

    from gradand.backends import jax as gj

    g = np.array([[1.0, -2.0, 3.0], [np.nan, -1.0, 2.0], [4.0, np.nan, -1.0]], np.float32)
    want = gradand.statistics(g, gradand.AndMask(0.5), nan_policy="propagate")
    got = jax.jit(lambda t: gj.statistics({"w": t}, gradand.AndMask(0.5)))(g)["w"]
    assert got.count == 3
    np.testing.assert_array_equal(np.asarray(got.sign_sum), want.sign_sum)  # [1, -1, 2]
    np.testing.assert_array_equal(np.isnan(np.asarray(got.mean)), np.isnan(want.mean))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_half_precision_accumulates_in_float32_and_returns_its_dtype(dtype):
    torch = _torch()
    g = torch.randn(8, 50, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    c = gradand.AndMask(0.5)
    s = gradand.statistics(g, c)
    assert s.mean.dtype == torch.float32 and s.sign_sum.dtype == torch.int32
    out = gradand.combine(g, c)
    assert out.dtype == getattr(torch, dtype)
    ref = gradand.combine(g.float().numpy(), c)
    np.testing.assert_allclose(out.float().numpy(), ref, rtol=2e-2, atol=2e-2)


def test_jax_bfloat16_accumulates_in_float32_and_returns_its_dtype():
    jnp = _jnp()
    g = jnp.asarray(np.random.default_rng(0).standard_normal((8, 20)), dtype=jnp.bfloat16)
    s = gradand.statistics(g, gradand.GeometricMean(0.5))
    assert s.log_abs_mean.dtype == jnp.float32
    assert gradand.combine(g, gradand.GeometricMean(0.5)).dtype == jnp.bfloat16


@pytest.mark.parametrize("combiner", COMBINERS, ids=repr)
def test_core_runs_inside_jax_jit(combiner):
    jnp = _jnp()
    import jax

    g = np.random.default_rng(4).standard_normal((5, 6)).astype(np.float32)
    jitted = jax.jit(lambda x: gradand.combine(x, combiner, return_info=True))
    out, info = jitted(jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(out), gradand.combine(g, combiner), rtol=1e-5, atol=1e-7)
    assert 0 <= float(info.survivor_fraction) <= 1


def test_torch_device_is_preserved():
    torch = _torch()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        g = torch.randn(4, 3, device=device)
        assert gradand.combine(g, gradand.AndMask(0.5)).device == g.device


@pytest.mark.cuda
def test_torch_cuda_results_equal_numpy():
    torch = _torch()
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    g = np.random.default_rng(5).standard_normal((6, 9)).astype(np.float32)
    for c in COMBINERS:
        out = gradand.combine(torch.from_numpy(g).cuda(), c)
        assert out.is_cuda
        np.testing.assert_allclose(out.cpu().numpy(), gradand.combine(g, c), rtol=1e-5, atol=1e-6)


def test_importing_gradand_imports_no_framework():
    code = (
        "import sys, gradand, gradand.consistency, gradand.temporal, gradand.experiments.patchwork\n"
        "import gradand.cli\n"
        "bad = [m for m in ('torch', 'jax', 'tensorflow', 'keras', 'optax') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_framework_registry_is_not_needed_for_array_api_namespaces():
    assert importlib.util.find_spec("array_api_compat") is not None
    assert gradand.array_namespace(np.zeros(2)).__name__ == "array_api_compat.numpy"
