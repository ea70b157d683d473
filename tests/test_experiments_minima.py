"""Consistency of the minima: numpy losses from exported weights, in every backend, and the estimate."""

from __future__ import annotations

import numpy as np
import pytest

from gradand.consistency import empirical_inconsistency
from gradand.experiments import minima, sweep
from gradand.experiments.training import MLPSpec, get_backend


def _data(seed=0, envs=3, n=12, features=4):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((envs, n, features)).astype(np.float32)
    return x, (x[..., 0] > 0).astype(np.float32)


@pytest.mark.parametrize("backend", ["torch", "jax", "tensorflow"])
def test_exported_layers_give_the_backends_own_logits(backend):
    pytest.importorskip({"tensorflow": "tensorflow"}.get(backend, backend))
    impl = get_backend(backend)
    spec = MLPSpec(in_features=4, out_features=1, hidden_units=6, hidden_layers=2)
    x, _ = _data()
    out = impl.trainer(impl.build(spec, seed=0), combiner=__import__("gradand").Mean(), loss="bce")
    layers = impl.dense_layers(out.model)
    assert [w.shape for w, _ in layers] == [(4, 6), (6, 6), (6, 1)]
    assert all(w.dtype == np.float64 and b.shape == (w.shape[1],) for w, b in layers)
    flat = x.reshape(-1, 4)
    logits = minima.mlp_logits(layers, flat.astype(np.float64))[:, 0]
    # the backend's prediction is logit > 0 (>= 0 is measure zero here)
    assert np.array_equal(out.predict(out.put(flat)), (logits > 0).astype(np.float32))


@pytest.mark.parametrize("backend", ["torch", "jax", "tensorflow"])
def test_export_refuses_batch_norm(backend):
    pytest.importorskip({"tensorflow": "tensorflow"}.get(backend, backend))
    impl = get_backend(backend)
    spec = MLPSpec(in_features=4, out_features=1, hidden_units=6, hidden_layers=1, batch_norm=True)
    with pytest.raises(ValueError, match="batch norm"):
        impl.dense_layers(impl.build(spec, seed=0))


def test_subspace_losses_at_zero_are_the_environments_losses_and_match_bce():
    rng = np.random.default_rng(1)
    layers = [
        (rng.standard_normal((4, 5)), rng.standard_normal(5)),
        (rng.standard_normal((5, 1)), np.zeros(1)),
    ]
    x, y = _data()
    losses = minima.subspace_losses(layers, x, y, dims=3, seed=0)
    for e, f in enumerate(losses):
        z = minima.mlp_logits(layers, x[e].astype(np.float64))[:, 0]
        p = 1 / (1 + np.exp(-z))
        expected = -np.mean(y[e] * np.log(p) + (1 - y[e]) * np.log(1 - p))
        assert f(np.zeros(3)) == pytest.approx(expected, rel=1e-10)
        # the cache (all environments at once at a point seen twice) gives the same value
        point = np.array([0.1, -0.2, 0.05])
        single = f(point)
        assert losses[(e + 1) % 3](point) == pytest.approx(
            minima.subspace_losses(layers, x, y, dims=3, seed=0)[(e + 1) % 3](point)
        )
        assert f(point) == single


def test_directions_are_scaled_to_each_layers_norm():
    """|z| = 1 along one direction moves every layer by exactly its own parameters' norm."""
    layers = [(np.full((2, 3), 10.0), np.zeros(3)), (np.full((3, 1), 0.1), np.zeros(1))]
    x, y = _data(features=2)
    losses = minima.subspace_losses(layers, x, y, dims=2, seed=0)
    inner = losses[0].__closure__[0].cell_contents
    moved = inner.layers(np.array([1.0, 0.0]))
    for (w, b), (w2, b2) in zip(layers, moved):
        before = np.sqrt(np.sum(w**2) + np.sum(b**2))
        assert np.sqrt(np.sum((w2 - w) ** 2) + np.sum((b2 - b) ** 2)) == pytest.approx(before)


def test_identical_environments_rise_by_at_most_epsilon():
    rng = np.random.default_rng(2)
    layers = [(rng.standard_normal((4, 5)), np.zeros(5)), (rng.standard_normal((5, 1)), np.zeros(1))]
    x, y = _data(envs=1)
    x, y = np.repeat(x, 3, axis=0), np.repeat(y, 3, axis=0)
    losses = minima.subspace_losses(layers, x, y, dims=3)
    est = empirical_inconsistency(losses, np.zeros(3), epsilon=0.1, n_probes=4, max_radius=0.5)
    base, there = losses[0](np.zeros(3)), losses[0](est.point)
    # B's loss is A's: inside A's ε-sublevel region it can rise by at most ε (θ* here is not a
    # minimum, so it may also fall; |L_B - L_A(θ*)| is then the fall)
    assert there <= base + 0.1 + 1e-9 and est.value == pytest.approx(abs(there - base))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"dims": 0}, "dims"), ({"epsilon": 0.0}, "epsilon"), ({"max_radius": float("inf")}, "max_radius"),
     ({"seed": -1}, "seed"), ({"n_probes": 1.5}, "n_probes")],
)  # fmt: skip
def test_bad_probe_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        minima.ProbeSetting(**kwargs)


def test_subspace_losses_reject_bad_shapes():
    layers = [(np.ones((4, 1)), np.zeros(1))]
    x, y = _data()
    with pytest.raises(ValueError, match="train_x"):
        minima.subspace_losses(layers, x[0], y[0])
    with pytest.raises(ValueError, match="one output"):
        minima.subspace_losses([(np.ones((4, 2)), np.zeros(2))], x, y)


def test_quick_run_reports_inconsistency_beside_test_accuracy_per_seed():
    pytest.importorskip("torch")
    data, train, _ = sweep.preset("quick")
    report = minima.run(data, train, probe=minima.PRESETS["quick"], seeds=(0, 1), show_progress=False)
    m = report.results["methods"]
    assert list(m) == list(minima.METHODS)
    for r in m.values():
        assert r["inconsistency"]["n"] == 2 and all(v >= 0 for v in r["inconsistency"]["values"])
        assert r["spread"]["values"][0] <= r["inconsistency"]["values"][0] + 1e-12  # I^ε >= |L_B - L_A| at θ*
    assert len(report.checks) == 2 and all("paired by seed" in c.claim for c in report.checks)
    assert {(r["method"], r["seed"]) for r in report.results["runs"]} == {
        (mm, s) for mm in minima.METHODS for s in (0, 1)
    }
