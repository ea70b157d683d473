"""Memorisation data: bundled digits, random labels, the optional CIFAR-10 loader (on fake files)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from gradand.experiments.memorization import THRESHOLDS, load_cifar10, load_digits, randomize_labels


def test_digits_split_is_disjoint_seeded_and_scaled_to_unit_range():
    a, b = load_digits(n_train=300, seed=0), load_digits(n_train=300, seed=0)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    assert a.train_x.shape == (300, 64) and a.test_x.shape == (1497, 64)
    assert a.train_x.dtype == np.float32 and a.train_y.dtype == np.int64
    assert 0.0 <= a.train_x.min() and a.train_x.max() <= 1.0
    rows = {r.tobytes() for r in a.train_x}
    assert sum(r.tobytes() in rows for r in a.test_x) < 5  # (the digits hold a few duplicate images)
    assert set(np.unique(a.train_y)) == set(range(10))
    assert not np.array_equal(load_digits(n_train=300, seed=1).train_x, a.train_x)
    with pytest.raises(ValueError, match="n_train"):
        load_digits(n_train=1797)


def test_random_labels_are_uniform_seeded_and_independent_of_the_true_ones():
    d = load_digits(n_train=1000)
    r = randomize_labels(d.train_y, 10, seed=0)
    np.testing.assert_array_equal(r, randomize_labels(d.train_y, 10, seed=0))
    assert not np.array_equal(r, randomize_labels(d.train_y, 10, seed=1))
    counts = np.bincount(r, minlength=10)
    assert counts.min() > 60 and counts.max() < 140
    assert 0.05 < np.mean(r == d.train_y) < 0.15  # agreement with the truth at chance level


def test_the_paper_sweeps_these_thresholds():
    assert THRESHOLDS == (0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8)


def _fake_cifar(root, n_per_batch=20, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n_per_batch).tolist(),
        }
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def test_cifar10_loader_reads_the_python_batches_and_standardises_per_channel(tmp_path):
    root = _fake_cifar(tmp_path / "cifar-10-batches-py")
    d = load_cifar10(root)
    assert d.train_x.shape == (100, 3, 32, 32) and d.test_x.shape == (20, 3, 32, 32)
    assert d.train_x.dtype == np.float32 and d.n_classes == 10 and d.name == "cifar10"
    np.testing.assert_allclose(d.train_x.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(d.train_x.std(axis=(0, 2, 3)), 1.0, atol=1e-4)
    assert load_cifar10(root, n_train=30).train_x.shape == (30, 3, 32, 32)


def test_cifar10_loader_names_the_missing_files(tmp_path):
    root = _fake_cifar(tmp_path / "c")
    (root / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="missing test_batch"):
        load_cifar10(root)


def test_class_level_ceiling_is_what_learning_classes_without_memorising_reaches():
    from gradand.experiments.memorization import class_level_ceiling

    true = np.repeat(np.arange(10), 50)
    rnd = randomize_labels(true, 10, seed=0)
    ceiling = class_level_ceiling(true, rnd, 10)
    assert 0.1 < ceiling < 0.3  # above chance by a finite-sample fluctuation, far from memorisation
    assert class_level_ceiling(true, true, 10) == 1.0
    # a predictor that outputs, per true class, the most frequent random label reaches it exactly
    best = np.array([np.bincount(rnd[true == c], minlength=10).argmax() for c in range(10)])
    assert np.mean(best[true] == rnd) == pytest.approx(ceiling)
