"""Hostile inputs to the core: NaN/Inf semantics, exact thresholds, stable statistics, validation.

Each test states a property of a whole class of inputs (issue 13, classes 1-4).
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gradand

COMBINERS = [
    gradand.Mean(),
    gradand.AndMask(threshold=0.5),
    gradand.AndMask(threshold=1.0, rescale=False),
    gradand.GeometricMean(threshold=0.5),
    gradand.SandMask(threshold=0.3, k=1.0),
]
IDS = ["mean", "and0.5", "and1", "geom", "sand"]


def _streamed(g: np.ndarray, combiner: gradand.Combiner, **kw) -> gradand.Statistics:
    s = gradand.Statistics()
    for e in range(g.shape[0]):
        s = s + gradand.statistics(g[e], combiner, axis=None, **kw)
    return s


def _chunked(g: np.ndarray, combiner: gradand.Combiner, cut: int, **kw) -> gradand.Statistics:
    return gradand.merge(
        gradand.statistics(g[:cut], combiner, **kw), gradand.statistics(g[cut:], combiner, **kw)
    )


def simulate_all_reduce(per_worker: list[list[gradand.Statistics]], **kw) -> list[list[gradand.Statistics]]:
    """Run ``gradand.all_reduce_statistics`` on each worker in its own thread, with a real SUM."""
    n = len(per_worker)
    barrier = threading.Barrier(n)
    slots: list = [None] * n
    results: list = [None] * n
    lock = threading.Lock()
    rounds = {"sums": []}

    def run(w: int) -> None:
        def all_reduce_sum(arrays):
            slots[w] = [np.asarray(a) for a in arrays]
            barrier.wait()
            if w == 0:
                with lock:
                    rounds["sums"] = [sum(parts) for parts in zip(*slots)]
            barrier.wait()
            out = [np.array(a) for a in rounds["sums"]]
            barrier.wait()
            return out

        results[w] = gradand.all_reduce_statistics(per_worker[w], all_reduce_sum, **kw)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---------------------------------------------------------------- class 1: NaN/Inf never become a clean 0


@pytest.mark.parametrize("combiner", COMBINERS, ids=IDS)
@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    envs=st.integers(1, 6),
    size=st.integers(1, 8),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_a_non_finite_gradient_propagates_to_its_component_on_every_path(
    combiner, data, envs, size, bad, dtype
):
    g = data.draw(
        st.lists(st.floats(-10, 10, width=32), min_size=envs * size, max_size=envs * size).map(
            lambda v: np.asarray(v, dtype=dtype).reshape(envs, size)
        )
    )
    e, i = data.draw(st.integers(0, envs - 1)), data.draw(st.integers(0, size - 1))
    g[e, i] = bad
    cut = data.draw(st.integers(1, envs)) if envs > 1 else 1
    paths = {
        "dense": gradand.statistics(g, combiner, nan_policy="propagate"),
        "streaming": _streamed(g, combiner, nan_policy="propagate"),
        "chunked": _chunked(g, combiner, cut, nan_policy="propagate") if cut < envs else None,
    }
    for name, s in paths.items():
        if s is None:
            continue
        out = gradand.finalize(s, combiner)
        assert not np.isfinite(out[i]), (name, out)
        (fused,) = gradand.finalize_many([s], combiner)
        assert not np.isfinite(fused[i]), (name, fused)
    out2 = gradand.finalize_many([paths["dense"], paths["dense"]], combiner)
    assert all(not np.isfinite(u[i]) for u in out2)


def test_the_issue_example_propagates_nan_instead_of_zero():
    out = gradand.combine(np.array([[1.0, 2.0], [np.nan, 1.0]]), gradand.AndMask(0.5), nan_policy="propagate")
    assert np.isnan(out[0]) and out[1] == 1.5  # the NaN casts no vote: 1 of 2 agree, kept, mean NaN


def test_agreement_propagates_nan_and_zero_policy_drops_the_vote():
    g = np.array([[1.0, 2.0], [np.nan, 1.0]])
    a = gradand.agreement(g, nan_policy="propagate")
    assert np.isnan(a[0]) and a[1] == 1.0
    np.testing.assert_array_equal(gradand.agreement(g, nan_policy="zero"), [0.5, 1.0])
    with pytest.raises(ValueError, match="grads contains NaN or Inf"):
        gradand.agreement(g)


def test_outer_statistics_propagate_non_finite_inputs():
    x = np.ones((3, 2))
    d = np.ones((3, 2))
    x[1, 0] = np.nan
    c = gradand.AndMask(0.5)
    out = gradand.finalize(gradand.outer_statistics(x, d, c, nan_policy="propagate"), c)
    assert np.all(np.isnan(out[:, 0])) and np.all(np.isfinite(out[:, 1]))


def test_masked_entries_are_positive_zero_when_finite():
    g = np.array([[-1.0, 2.0], [-3.0, -1.0]])
    out = gradand.combine(g, gradand.AndMask(1.0, rescale=False))
    assert out[1] == 0.0 and not np.signbit(out[1])


def test_torch_backward_propagates_nan_into_grad():
    torch = pytest.importorskip("torch")
    from gradand.backends import torch as gt

    w = torch.nn.Parameter(torch.ones(3))
    losses = torch.stack([(w * torch.tensor([1.0, float("nan"), 1.0])).sum(), (w * 2.0).sum()])
    gt.backward(losses, [w], gradand.AndMask(1.0), nan_policy="propagate")
    assert torch.isnan(w.grad[1]) and torch.isfinite(w.grad[0])


def test_jax_jit_with_the_default_policy_gives_nan_not_zero():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from gradand.backends import jax as gj

    c = gradand.AndMask(1.0)
    g = {"w": jnp.array([[1.0, jnp.nan], [2.0, 1.0]])}
    out = jax.jit(lambda t: gj.combine(t, c))(g)  # "raise" cannot run under jit
    assert bool(jnp.isnan(out["w"][1])) and bool(jnp.isfinite(out["w"][0]))


# ---------------------------------------------------------------- class 2: exact thresholds


def _votes(envs: int, plus: int, minus: int, dtype) -> np.ndarray:
    g = np.zeros((envs, 1), dtype=dtype)
    g[:plus] = 0.5
    g[plus : plus + minus] = -0.25
    return g


@settings(max_examples=300, deadline=None)
@given(envs=st.integers(1, 400), data=st.data(), dtype=st.sampled_from([np.float16, np.float32, np.float64]))
def test_threshold_k_over_e_keeps_exactly_the_components_with_k_net_votes(envs, data, dtype):
    k = data.draw(st.integers(0, envs))
    tau = k / envs
    plus = data.draw(st.integers(0, envs))
    minus = data.draw(st.integers(0, envs - plus))
    g = _votes(envs, plus, minus, dtype)
    keep = abs(plus - minus) >= k
    c = gradand.AndMask(tau, rescale=False)
    for s in (gradand.statistics(g, c), _streamed(g, c)):
        out = gradand.finalize(s, c)
        if not keep:  # a dropped component is exactly +0
            assert out[0] == 0 and not np.signbit(out[0]), (envs, k, plus, minus)
        else:  # a kept one is the mean (which may round to a tiny value where votes cancel)
            assert out[0] == s.mean[0].astype(out.dtype)
        assert bool(gradand._combiners.hard_mask(s, tau, np)[0]) == keep


def test_the_issue_examples_keep_exact_agreement_in_both_dtypes():
    g = _votes(25, 16, 9, np.float64)  # agreement exactly 7/25 = 0.28
    for dt in (np.float32, np.float64):
        assert gradand.combine(g.astype(dt), gradand.AndMask(0.28, rescale=False))[0] != 0
    g = _votes(200, 155, 45, np.float64)  # 110/200 = 0.55
    for dt in (np.float32, np.float64):
        assert gradand.combine(g.astype(dt), gradand.AndMask(0.55, rescale=False))[0] != 0


@settings(max_examples=300, deadline=None)
@given(tau=st.floats(0, 1), envs=st.integers(1, 10**6))
def test_required_votes_is_the_smallest_k_whose_quotient_reaches_the_threshold(tau, envs):
    k = gradand.required_votes(tau, envs)
    assert 0 <= k <= envs
    assert k / envs >= tau
    assert k == 0 or (k - 1) / envs < tau


def test_sign_votes_stay_exact_past_2_to_the_24_environments():
    c = gradand.AndMask(1.0, rescale=False)
    big = 2**24 + 3
    one = gradand.statistics(np.ones(4, np.float32), c, axis=None)
    many = gradand.Statistics(
        count=big, mean=np.ones(4, np.float32), sign_sum=np.full(4, big, np.int32), dtype=np.float32
    )
    total = many + one + one
    assert total.count == big + 2
    np.testing.assert_array_equal(total.sign_sum, np.full(4, big + 2))
    np.testing.assert_array_equal(gradand.finalize(total, c), np.ones(4))  # every vote agrees: kept
    flipped = many + gradand.statistics(-np.ones(4, np.float32), c, axis=None)
    np.testing.assert_array_equal(flipped.sign_sum, np.full(4, big - 1))
    assert not np.any(gradand.finalize(flipped, c))  # one dissent among 2**24 + 4: dropped


def test_merging_past_the_int32_vote_limit_is_refused():
    c = gradand.AndMask()
    a = gradand.Statistics(count=gradand.MAX_COUNT, mean=np.ones(1), sign_sum=np.ones(1, np.int32))
    with pytest.raises(OverflowError, match="int32"):
        a + gradand.statistics(np.ones(1), c, axis=None)


# ---------------------------------------------------------------- class 3: stable statistics


def test_mean_of_huge_float32_gradients_does_not_overflow_on_any_path():
    g = np.full((4, 3), 1e38, np.float32)
    for c in (gradand.Mean(), gradand.AndMask(), gradand.SandMask(0.5, k=1.0)):
        for s in (gradand.statistics(g, c), _streamed(g, c), _chunked(g, c, 1)):
            np.testing.assert_allclose(s.mean, 1e38, rtol=1e-6)
    opposite = np.array([[3e38], [-3e38]], np.float32)
    assert np.isfinite(gradand.combine(opposite, gradand.Mean())).all()
    assert np.isfinite(_streamed(opposite, gradand.Mean()).mean).all()


def test_sand_mask_variance_neither_overflows_nor_cancels_in_float32():
    c = gradand.SandMask(0.5, k=1.0, rescale=False)
    g = np.array([[1e19], [1.1e19], [1.2e19]])
    np.testing.assert_allclose(
        gradand.statistics(g.astype(np.float32), c).m2, gradand.statistics(g, c).m2, rtol=1e-5
    )
    c = gradand.SandMask(0.99, k=1.0)
    g = np.array([[10001.0], [9999.0], [10000.0]])
    for s in (gradand.statistics(g.astype(np.float32), c), _streamed(g.astype(np.float32), c)):
        np.testing.assert_allclose(s.m2, [2.0], rtol=1e-6)
    np.testing.assert_allclose(gradand.combine(g.astype(np.float32), c), gradand.combine(g, c), rtol=1e-5)


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    envs=st.integers(2, 12),
    size=st.integers(1, 6),
    scale=st.sampled_from([1e-20, 1e-3, 1.0, 1e4, 1e19, 1e30]),
    offset=st.sampled_from([0.0, 1.0, 1e4]),
)
def test_float32_statistics_track_float64_and_every_path_agrees(data, envs, size, scale, offset):
    noise = data.draw(
        st.lists(st.floats(-1, 1), min_size=envs * size, max_size=envs * size).map(
            lambda v: np.asarray(v).reshape(envs, size)
        )
    )
    g64 = (offset + noise) * scale
    g32 = g64.astype(np.float32)
    assume(np.all(np.isfinite(g32)))
    c = gradand.SandMask(0.3, k=1.0)
    ref = gradand.statistics(g32.astype(np.float64), c)
    assume(np.all(ref.m2 < 1e37))  # a variance beyond float32's range is inf there by definition
    cut = data.draw(st.integers(1, envs - 1))
    paths = [gradand.statistics(g32, c), _streamed(g32, c), _chunked(g32, c, cut)]
    spread = float(np.max(np.abs(g32.astype(np.float64) - ref.mean)))
    for s in paths:
        np.testing.assert_array_equal(s.sign_sum, ref.sign_sum)  # the votes are exact everywhere
        np.testing.assert_allclose(s.mean, ref.mean, rtol=1e-5, atol=1e-6 * scale * (1 + offset))
        # M2 errs by float32 rounding of the mean times the spread — not of offset² (no cancellation)
        ulp = float(np.finfo(np.float32).eps) * float(np.max(np.abs(g32)))
        tol = 1e-4 * envs * spread**2 + 4 * envs * spread * ulp + 1e-30
        np.testing.assert_allclose(s.m2, ref.m2, rtol=1e-4, atol=tol)


@pytest.mark.parametrize("combiner", COMBINERS, ids=IDS)
@pytest.mark.parametrize("split", [[3], [1, 1, 1], [2, 5, 1]])
def test_distributed_all_reduce_equals_merging_in_one_process(combiner, split):
    rng = np.random.default_rng(len(split))
    g = rng.standard_normal((sum(split), 4, 3)).astype(np.float32)
    bounds = np.cumsum([0, *split])
    per_worker = [
        [gradand.statistics(g[a:b, 0], combiner), gradand.statistics(g[a:b, 1:], combiner)]
        for a, b in itertools.pairwise(bounds)
    ]
    reference = [gradand.statistics(g[:, 0], combiner), gradand.statistics(g[:, 1:], combiner)]
    for known in (None, int(bounds[-1])):
        for worker in simulate_all_reduce(per_worker, total_count=known):
            for got, want in zip(worker, reference):
                assert got.count == want.count
                if want.sign_sum is not None:
                    np.testing.assert_array_equal(got.sign_sum, want.sign_sum)
                for name in ("mean", "log_abs_mean", "m2"):
                    if getattr(want, name) is not None:
                        np.testing.assert_allclose(
                            getattr(got, name), getattr(want, name), rtol=2e-5, atol=1e-6
                        )
                np.testing.assert_allclose(
                    gradand.finalize(got, combiner), gradand.finalize(want, combiner), rtol=2e-5, atol=1e-6
                )


# ---------------------------------------------------------------- class 4: validation names the argument


@pytest.mark.parametrize(
    ("count", "error", "match"),
    [
        (0, ValueError, "count must be the number of environments.*got count=0"),
        (-1, ValueError, "got count=-1"),
        (2**31, ValueError, "between 1 and 2147483647"),
        (1.5, TypeError, "count must be an int"),
        (2.0, TypeError, "count must be an int"),
        (True, TypeError, "count must be the number of environments"),
        (np.zeros(2), TypeError, "0-d array"),
    ],
)
def test_statistics_refuse_impossible_counts(count, error, match):
    with pytest.raises(error, match=match):
        gradand.Statistics(count=count, mean=np.ones(2), sign_sum=np.ones(2, np.int32))


def test_empty_statistics_must_count_zero():
    with pytest.raises(ValueError, match="empty set of environments and must have count=0"):
        gradand.Statistics(count=3)
    assert gradand.Statistics(count=np.int64(2), mean=np.ones(1)).count == 2


NUMBERS = [
    np.float32(0.5),
    np.float64(0.5),
    np.float16(0.5),
    np.int64(1),
    np.int32(0),
    1,
    0.25,
    np.array(0.5),
]


@pytest.mark.parametrize("value", NUMBERS, ids=[f"{type(v).__name__}({v})" for v in NUMBERS])
def test_numpy_scalars_are_accepted_wherever_python_numbers_are(value):
    assert gradand.AndMask(value).threshold == float(value)
    assert gradand.GeometricMean(value).threshold == float(value)
    assert gradand.SandMask(value, k=value + 1).k == float(value) + 1
    if float(value) > 0:
        assert gradand.GeometricMean(eps=value).eps == float(value)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"threshold": True}, TypeError, "threshold must be a real number; got True"),
        ({"threshold": "0.5"}, TypeError, "threshold must be a real number"),
        ({"threshold": 1 + 0j}, TypeError, "threshold must be a real number"),
        ({"threshold": np.nan}, ValueError, "threshold must be finite"),
        ({"threshold": 1.5}, ValueError, r"threshold must be in \[0, 1\]"),
        ({"threshold": np.float32(-0.1)}, ValueError, r"threshold must be in \[0, 1\]"),
        ({"threshold": np.zeros(2)}, TypeError, "threshold must be a real number"),
        ({"rescale": 1}, TypeError, "rescale must be True or False"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        gradand.AndMask(**kwargs)


def test_axis_accepts_numpy_integers_and_refuses_bools_and_floats():
    g = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(gradand.combine(g, gradand.Mean(), axis=np.int64(1)), [1.0, 4.0])
    np.testing.assert_array_equal(gradand.combine(g, gradand.Mean(), axis=-1), [1.0, 4.0])
    for bad in (True, 1.0, "0"):
        with pytest.raises(TypeError, match="axis must be an int"):
            gradand.combine(g, gradand.Mean(), axis=bad)
    with pytest.raises(ValueError, match=r"axis=2 is not an axis of grads with shape \(2, 3\)"):
        gradand.combine(g, gradand.Mean(), axis=2)


def test_mixing_array_libraries_is_refused_with_a_clear_message():
    torch = pytest.importorskip("torch")
    c = gradand.AndMask()
    with pytest.raises(TypeError, match=r"inputs and deltas mix arrays of different libraries"):
        gradand.outer_statistics(np.ones((2, 3)), torch.ones(2, 4), c)
    with pytest.raises(TypeError, match=r"stats\[0\] and stats\[1\] mix arrays of different libraries"):
        gradand.finalize_many(
            [gradand.statistics(np.ones((2, 3)), c), gradand.statistics(torch.ones(2, 3), c)], c
        )
    with pytest.raises(TypeError, match="cannot merge statistics held in"):
        gradand.statistics(np.ones((2, 3)), c) + gradand.statistics(torch.ones(2, 3), c)


@pytest.mark.parametrize(
    ("grads", "error", "match"),
    [
        (np.ones((2, 3), dtype=np.int64), TypeError, "grads must have a real floating dtype"),
        (np.ones((2, 3), dtype=np.complex64), TypeError, "grads must have a real floating dtype"),
        (np.ones((2, 3), dtype=bool), TypeError, "grads must have a real floating dtype"),
        (np.ones((0, 3)), ValueError, "grads has 0 environments"),
        ([[1.0, 2.0]], TypeError, "grads must be an array"),
    ],
)
def test_bad_gradients_name_the_argument(grads, error, match):
    with pytest.raises(error, match=match):
        gradand.combine(grads, gradand.AndMask())


def test_bad_nan_policy_and_return_info_are_refused():
    g = np.ones((2, 3))
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        gradand.combine(g, gradand.Mean(), nan_policy="ignore")
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        gradand.combine(g, gradand.Mean(), nan_policy=["zero"])
    with pytest.raises(TypeError, match="return_info must be True or False"):
        gradand.combine(g, gradand.Mean(), return_info="yes")
