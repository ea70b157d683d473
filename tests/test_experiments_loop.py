"""The one training loop: same batches for a seed in every backend, one schedule, lazy read-back, registry."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import gradand
from gradand.experiments import TRAINING_MODULES, patchwork
from gradand.experiments.training import (
    Backend,
    MLPSpec,
    Trainer,
    fit,
    get_backend,
    train_classifier,
)


class Lazy:
    """A device scalar stand-in: records how many steps had been taken when it is read."""

    def __init__(self, value: float, trainer: Recorder) -> None:
        self.value, self.trainer = value, trainer

    def __float__(self) -> float:
        self.trainer.reads.append(len(self.trainer.batches))
        return self.value


class Recorder:
    """A :class:`Trainer` in numpy that records what the loop asks of it."""

    def __init__(self) -> None:
        self.model = None
        self.batches: list[np.ndarray] = []
        self.rates: list[tuple[int, float]] = []
        self.reads: list[int] = []

    def put(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def take(self, array: np.ndarray, index: np.ndarray) -> np.ndarray:
        return array[index]

    def set_learning_rate(self, rate: float) -> None:
        self.rates.append((len(self.batches), rate))

    def step(self, x: np.ndarray, y: np.ndarray) -> Lazy:
        self.batches.append(x)
        return Lazy(0.5, self)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.zeros(len(x))


def _ids(envs: int, n: int) -> np.ndarray:
    """Inputs that name themselves: example i of environment e is the number 100 e + i."""
    return (100 * np.arange(envs)[:, None] + np.arange(n)[None, :]).astype(np.float32)[..., None]


def _fit(trainer: Trainer, **kw):
    x = _ids(4, 6)
    defaults = dict(eval_sets={}, epochs=3, batch_size=3, lr=1.0, seed=5, show_progress=False)
    return fit(trainer, train_x=x, train_y=np.zeros((4, 6), np.float32), **{**defaults, **kw})


def test_the_recorder_and_every_backend_implement_the_protocols():
    assert isinstance(Recorder(), Trainer)
    for name in TRAINING_MODULES:
        assert isinstance(get_backend(name), Backend) and get_backend(name).name == name


def test_every_epoch_each_example_of_each_environment_is_seen_once_in_a_fresh_order():
    rec = Recorder()
    out = _fit(rec)
    assert out["steps"] == len(rec.batches) == 3 * 2
    epochs = [np.concatenate(rec.batches[i : i + 2], axis=1)[..., 0] for i in (0, 2, 4)]
    for seen in epochs:
        assert seen.shape == (4, 6)
        for e in range(4):  # environment e's batch holds environment e's examples, each once
            np.testing.assert_array_equal(np.sort(seen[e]), 100 * e + np.arange(6))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_the_batches_depend_on_the_shuffle_seed_only():
    a, b, c = Recorder(), Recorder(), Recorder()
    _fit(a, seed=1)
    _fit(b, seed=1)
    _fit(c, seed=2)
    np.testing.assert_array_equal(np.stack(a.batches), np.stack(b.batches))
    assert not np.array_equal(np.stack(a.batches), np.stack(c.batches))


def test_a_subset_of_environments_per_step_covers_every_environment_each_epoch():
    rec = Recorder()
    _fit(rec, envs_per_step=2, epochs=1)
    envs = [set((b[:, 0, 0] // 100).astype(int).tolist()) for b in rec.batches]
    assert len(rec.batches) == 4 and all(len(e) == 2 for e in envs)
    assert envs[0] | envs[1] == {0, 1, 2, 3}


def test_the_learning_rate_is_set_before_the_first_step_and_once_at_the_milestone():
    rec = Recorder()
    _fit(rec, epochs=4, lr=0.5, lr_milestone=0.75, lr_decay=0.1)
    assert rec.rates == [(0, 0.5), (6, pytest.approx(0.05))]


def test_kept_fractions_are_read_back_only_after_the_last_step():
    rec = Recorder()
    out = _fit(rec)
    assert out["survivor_fraction"] == 0.5
    assert rec.reads == [out["steps"]] * out["steps"]  # every step's value, all read after the last step


def test_unknown_backend_names_the_choices():
    with pytest.raises(
        ValueError, match=r"backend must be one of \['jax', 'tensorflow', 'torch'\]; got 'mx'"
    ):
        get_backend("mx")


def test_a_missing_framework_says_what_to_install(monkeypatch):
    from gradand.experiments import torch_training

    monkeypatch.setattr(torch_training, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'gradand\[torch\]'"):
        get_backend("torch").build(
            MLPSpec(in_features=2, out_features=1, hidden_units=2, hidden_layers=1), seed=0
        )


BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=module))
    for name, module in (("torch", "torch"), ("jax", "optax"), ("tensorflow", "tensorflow"))
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_trains_a_spec_through_the_same_loop_and_learns_a_linear_rule(backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 32, 3)).astype(np.float32)
    y = (x[..., 0] > 0).astype(np.float32)
    spec = MLPSpec(in_features=3, out_features=1, hidden_units=16, hidden_layers=1)
    out = train_classifier(
        spec, backend=backend, train_x=x, train_y=y, eval_sets={"train": (x.reshape(-1, 3), y.reshape(-1))},
        combiner=gradand.AndMask(0.5), loss="bce", epochs=20, batch_size=16, lr=3e-2, lr_milestone=0.75,
        weight_decay=1e-4, l1=1e-5, show_progress=False,
    )  # fmt: skip
    assert out["final"]["train"] >= 0.9 and 0 < out["survivor_fraction"] < 1
    assert out["steps"] == 40 and out["model"] is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_cnn_is_built_by_torch_and_refused_with_the_alternative_elsewhere(backend):
    from gradand.experiments.training import CNNSpec

    spec = CNNSpec(in_channels=3, n_classes=10, width=2)
    if backend == "torch":
        assert type(get_backend(backend).build(spec, seed=0)).__name__ == "Sequential"
    else:
        with pytest.raises(ValueError, match="use --backend torch for CIFAR-10"):
            get_backend(backend).build(spec, seed=0)


def test_the_init_seed_and_the_shuffle_seed_are_separate_inputs():
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 3)).astype(np.float32)
    y = (x[..., 0] > 0).astype(np.float32)
    spec = MLPSpec(in_features=3, out_features=1, hidden_units=4, hidden_layers=1)

    def weights(**seeds):
        out = train_classifier(
            spec, backend="torch", train_x=x, train_y=y, eval_sets={}, combiner=gradand.Mean(), loss="bce",
            epochs=1, batch_size=4, lr=1e-2, show_progress=False, **seeds,
        )  # fmt: skip
        return np.concatenate([p.detach().numpy().ravel() for p in out["model"].parameters()])

    same = weights(seed=0, init_seed=0)
    np.testing.assert_array_equal(weights(seed=0), same)  # init_seed defaults to seed
    assert not np.array_equal(weights(seed=1, init_seed=0), same)  # other batches
    assert not np.array_equal(weights(seed=0, init_seed=1), same)  # other initialisation


def test_patchwork_names_the_backends_it_supports():
    with pytest.raises(ValueError, match="use numpy, torch, jax, tensorflow"):
        patchwork.train(gradand.Mean(), backend="mxnet")
    with pytest.raises(ValueError, match="the numpy backend runs on the CPU"):
        patchwork.train(gradand.Mean(), device="cuda")
