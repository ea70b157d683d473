"""Memorisation with every example its own environment (paper §3, CIFAR-10 with random labels).

Averaging per-example gradients lets a network memorise labels that carry no
pattern at all: every example pulls its own weights, and the average moves
them all. The AND-mask with every example as its own environment keeps only
the directions on which a fraction τ of the examples of a batch agree, so
with random labels (no shared direction) it barely moves, while with true
labels (shared directions exist) it still learns and generalises.

CIFAR-10 cannot be downloaded on the machines this is developed on, so the
default dataset is scikit-learn's bundled handwritten digits (1797 8×8
images, 10 classes; no download). :func:`load_cifar10` reads the CIFAR-10
"python version" batches for users who have them on disk; it is optional.
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from gradand.experiments import TRAINING_MODULES
from gradand.experiments.training import CNNSpec, MLPSpec, train_classifier

__all__ = [
    "CIFAR10_CHANGES",
    "LABELS",
    "PRESETS",
    "QUICK_THRESHOLDS",
    "THRESHOLDS",
    "Dataset",
    "MemorizationSetting",
    "class_level_ceiling",
    "load_cifar10",
    "load_digits",
    "randomize_labels",
    "run",
]

#: The paper's τ sweep.
THRESHOLDS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8)


class Dataset(NamedTuple):
    """A classification dataset split into train and test (float32 inputs, int64 labels).

    Attributes:
        train_x: (N, ...) training inputs.
        train_y: (N,) training labels.
        test_x: (M, ...) test inputs.
        test_y: (M,) test labels.
        n_classes: number of classes.
        name: the dataset's name.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    n_classes: int
    name: str


def load_digits(*, n_train: int = 500, seed: int = 0) -> Dataset:
    """scikit-learn's bundled digits (no download): 64 pixel features scaled to [0, 1], 10 classes.

    A seeded permutation puts ``n_train`` images in the training set and the
    rest (1797 - ``n_train``) in the test set.

    Example:
        >>> from gradand.experiments.memorization import load_digits
        >>> d = load_digits(n_train=1000)
        >>> d.train_x.shape, d.test_x.shape, d.n_classes, float(d.train_x.max())
        ((1000, 64), (797, 64), 10, 1.0)
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ImportError(
            "the digits dataset comes with scikit-learn: pip install 'gradand[experiments]'"
        ) from None
    bunch = sk_load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    if not 1 <= n_train < len(x):
        raise ValueError(f"n_train must be in [1, {len(x) - 1}] for the {len(x)} digits; got {n_train}")
    order = np.random.default_rng(seed).permutation(len(x))
    tr, te = order[:n_train], order[n_train:]
    return Dataset(x[tr], y[tr], x[te], y[te], 10, "digits")


def _unpickle(path: Path) -> dict[Any, Any]:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def load_cifar10(path: str | Path, *, n_train: int | None = None, seed: int = 0) -> Dataset:
    """CIFAR-10 from the "python version" files on disk (optional; nothing is downloaded).

    ``path`` is the ``cifar-10-batches-py`` directory (``data_batch_1`` …
    ``data_batch_5``, ``test_batch``) from
    https://www.cs.toronto.edu/~kriz/cifar.html. Images come back as
    (N, 3, 32, 32) float32, standardised per channel with the training set's
    mean and standard deviation. ``n_train`` takes a seeded random subset of
    the 50 000 training images (the full set is slow on a CPU).

    Only load files you trust: the batches are Python pickles.

    Example:
        >>> from gradand.experiments.memorization import load_cifar10
        >>> load_cifar10("/nonexistent")
        Traceback (most recent call last):
        ...
        FileNotFoundError: CIFAR-10 not found: '/nonexistent' must be the cifar-10-batches-py directory ...
    """
    root = Path(path)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: {str(root)!r} must be the cifar-10-batches-py directory with "
            f"{', '.join(names)} (missing {', '.join(missing)}); download the python version from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html"
        )

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        batch = _unpickle(root / name)
        x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x, np.asarray(batch[b"labels"], dtype=np.int64)

    parts = [read(n) for n in names[:5]]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = read("test_batch")
    if n_train is not None:
        if not 1 <= n_train <= len(train_x):
            raise ValueError(f"n_train must be in [1, {len(train_x)}]; got {n_train}")
        keep = np.random.default_rng(seed).permutation(len(train_x))[:n_train]
        train_x, train_y = train_x[keep], train_y[keep]
    train_f = train_x.astype(np.float32) / 255.0
    mean = train_f.mean(axis=(0, 2, 3), keepdims=True)
    std = train_f.std(axis=(0, 2, 3), keepdims=True)
    test_f = test_x.astype(np.float32) / 255.0
    return Dataset((train_f - mean) / std, train_y, (test_f - mean) / std, test_y, 10, "cifar10")


def class_level_ceiling(true_labels: np.ndarray, random_labels: np.ndarray, n_classes: int) -> float:
    """Training accuracy on random labels of the best map *true class → random label*.

    What a model can reach on random labels by learning the images' classes
    rather than memorising individual examples: with finitely many examples
    per class, some random label is, by chance, the most frequent one in each
    class. Above this, a model is memorising.

    Example:
        >>> import numpy as np
        >>> from gradand.experiments.memorization import class_level_ceiling
        >>> class_level_ceiling(np.array([0, 0, 0, 1, 1]), np.array([2, 2, 1, 0, 1]), 3)
        0.6
    """
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(true_labels), np.asarray(random_labels)), 1)
    return float(counts.max(axis=1).sum() / max(len(true_labels), 1))


def randomize_labels(labels: np.ndarray, n_classes: int, *, seed: int) -> np.ndarray:
    """Replace every label by one drawn uniformly from the ``n_classes`` classes (seeded).

    Example:
        >>> import numpy as np
        >>> from gradand.experiments.memorization import randomize_labels
        >>> y = randomize_labels(np.zeros(1000, dtype=np.int64), 10, seed=0)
        >>> y.dtype, int(y.min()), int(y.max()), bool(0.05 < (y == 0).mean() < 0.15)
        (dtype('int64'), 0, 9, True)
    """
    rng = np.random.default_rng([seed, 0x4D454D])
    return rng.integers(0, n_classes, size=np.shape(labels)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class MemorizationSetting:
    """Training settings of the memorisation sweep.

    An MLP (``hidden_layers`` × ``hidden_units``, ReLU) for the digits, a
    small CNN for CIFAR-10; Adam with L2 ``weight_decay`` (the reference
    code's ``weight_decay_order='before'`` for CIFAR-10: decay added to the
    gradient before the optimizer), batches of ``batch_size`` examples, each
    example its own environment, AND-mask with rescaling. ``τ = 0`` is plain
    averaging (trained with an ordinary ``loss.backward()``).
    """

    n_train: int = 500
    hidden_units: int = 128
    hidden_layers: int = 2
    epochs: int = 50
    batch_size: int = 50
    lr: float = 3e-3
    weight_decay: float = 0.0
    eval_every: int = 5


#: ``default`` (the CLI's default, a few minutes on a CPU) and ``quick`` (seconds).
PRESETS: dict[str, MemorizationSetting] = {
    "default": MemorizationSetting(),
    "quick": MemorizationSetting(n_train=200, epochs=30, eval_every=10),
}

#: What changes for CIFAR-10 (the reference code's batch of 80 and learning rate 5e-4; a subset of
#: the training set, since per-example gradients of a CNN are slow on a CPU).
CIFAR10_CHANGES: dict[str, Any] = {"n_train": 5000, "batch_size": 80, "lr": 5e-4, "epochs": 30}

#: The τ values of the quick preset (the full sweep is :data:`THRESHOLDS`).
QUICK_THRESHOLDS: tuple[float, ...] = (0.0, 0.2)

#: Training label kinds: ``random`` (drawn uniformly, the memorisation test) and ``true``.
LABELS: tuple[str, ...] = ("random", "true")


def _model(data: Dataset, setting: MemorizationSetting) -> MLPSpec | CNNSpec:
    """The classifier: an MLP on flat inputs, a small CNN on images (PyTorch only)."""
    n_in, n_out = data.train_x.shape[1], data.n_classes
    if data.train_x.ndim != 2:
        return CNNSpec(in_channels=n_in, n_classes=n_out)
    return MLPSpec(
        in_features=n_in,
        out_features=n_out,
        hidden_units=setting.hidden_units,
        hidden_layers=setting.hidden_layers,
        activation="relu",
    )


def _train(
    backend: str,
    data: Dataset,
    train_y: np.ndarray,
    setting: MemorizationSetting,
    threshold: float,
    *,
    seed: int,
    device: str,
    show_progress: bool,
    desc: str,
) -> dict[str, Any]:
    from gradand._combiners import AndMask, Mean

    combiner = Mean() if threshold == 0 else AndMask(threshold=threshold, rescale=True)
    return train_classifier(
        _model(data, setting),
        backend=backend,
        train_x=data.train_x[:, None],
        train_y=train_y[:, None],
        eval_sets={"train": (data.train_x, train_y), "test": (data.test_x, data.test_y)},
        combiner=combiner,
        loss="ce",
        epochs=setting.epochs,
        batch_size=1,
        envs_per_step=setting.batch_size,
        lr=setting.lr,
        weight_decay=setting.weight_decay,
        eval_every=setting.eval_every,
        seed=seed,
        device=device,
        show_progress=show_progress,
        desc=desc,
    )


#: Backends that can train this experiment, and their training function.
TRAINERS = {name: functools.partial(_train, name) for name in TRAINING_MODULES}


def run(
    data: Dataset,
    setting: MemorizationSetting,
    *,
    thresholds: tuple[float, ...] = THRESHOLDS,
    labels: tuple[str, ...] = LABELS,
    seeds: tuple[int, ...] = (0,),
    backend: str = "torch",
    device: str = "cpu",
    show_progress: bool = True,
    preset_name: str = "custom",
    log: Any = None,
) -> Any:
    """The τ sweep on random and true labels; a :class:`gradand.experiments._report.Report`.

    Seed ``s`` draws the random labels and initialises the model (the same
    for every τ). Test labels are always the true ones; with random training
    labels, test accuracy stays at chance whatever the method. ``log(message)``,
    when given, receives one line per finished run.

    Example:
        >>> import numpy as np
        >>> from gradand.experiments.memorization import Dataset, MemorizationSetting, run
        >>> rng = np.random.default_rng(0)
        >>> x = rng.random((40, 4)).astype(np.float32)
        >>> y = (x[:, 0] > 0.5).astype(np.int64)
        >>> data = Dataset(x[:20], y[:20], x[20:], y[20:], 2, "toy")
        >>> s = MemorizationSetting(hidden_units=8, epochs=1, batch_size=10, eval_every=1)
        >>> report = run(data, s, thresholds=(0.0, 0.5), labels=("true",), show_progress=False)
        >>> sorted(report.results["true"])
        ['0.0', '0.5']
    """
    from gradand.experiments._report import Check, Report, format_table, mean_std

    if backend not in TRAINERS:
        raise ValueError(
            f"backend {backend!r} is not supported for the memorization experiment; use one of "
            f"{sorted(TRAINERS)}"
        )
    for t in thresholds:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"thresholds must lie in [0, 1]; got {t!r}")
    bad = [lab for lab in labels if lab not in LABELS]
    if bad or not labels:
        raise ValueError(f"labels must be a non-empty subset of {LABELS}; got {list(labels)}")
    trainer = TRAINERS[backend]
    results: dict[str, Any] = {lab: {} for lab in labels}
    ceilings = []
    for lab in labels:
        for t in thresholds:
            results[lab][str(float(t))] = {
                "train_acc": [],
                "test_acc": [],
                "survivor_fraction": [],
                "curves": [],
            }
    for seed in seeds:
        for lab in labels:
            if lab == "random":
                train_y = randomize_labels(data.train_y, data.n_classes, seed=seed)
                ceilings.append(class_level_ceiling(data.train_y, train_y, data.n_classes))
            else:
                train_y = data.train_y
            for t in thresholds:
                out = trainer(
                    data,
                    train_y,
                    setting,
                    float(t),
                    seed=seed,
                    device=device,
                    show_progress=show_progress,
                    desc=f"memorization {lab} labels τ={t} seed {seed}",
                )
                r = results[lab][str(float(t))]
                if log is not None:
                    log(
                        f"memorization {lab} labels τ={t} seed {seed}: train {out['final']['train']:.3f} "
                        f"test {out['final']['test']:.3f} ({out['seconds']:.1f} s)"
                    )
                r["train_acc"].append(out["final"]["train"])
                r["test_acc"].append(out["final"]["test"])
                r["survivor_fraction"].append(out["survivor_fraction"])
                r["curves"].append(out["curve"])
    rows = []
    for lab in labels:
        for key, r in results[lab].items():
            r["train_mean"], r["train_std"] = mean_std(r["train_acc"])
            r["test_mean"], r["test_std"] = mean_std(r["test_acc"])
            rows.append(
                [
                    lab,
                    key,
                    "mean" if float(key) == 0 else "and_mask",
                    f"{r['train_mean']:.3f} ± {r['train_std']:.3f}",
                    f"{r['test_mean']:.3f} ± {r['test_std']:.3f}",
                    f"{float(np.mean(r['survivor_fraction'])):.3f}",
                ]
            )
    table = format_table(["labels", "τ", "combiner", "train acc", "test acc", "grad kept"], rows)
    notes = []
    if ceilings:
        results["random_label_class_ceiling"] = ceilings
        notes.append(
            f"random labels: mapping each true class to its most frequent random label (learning the "
            f"classes, memorising nothing) gives train accuracy {np.mean(ceilings):.3f}; above that a "
            f"model memorises individual examples"
        )

    chance = 1.0 / data.n_classes
    checks = []
    random_res, true_res = results.get("random", {}), results.get("true", {})
    if "0.0" in random_res:
        v = random_res["0.0"]["train_mean"]
        checks.append(
            Check(
                f"random labels: plain averaging memorises, train accuracy >= 0.9 (measured {v:.3f})",
                v >= 0.9,
                {"train_mean": v},
            )
        )
    high = {k: r["train_mean"] for k, r in random_res.items() if float(k) >= 0.2}
    if high:
        worst = max(high, key=high.get)
        checks.append(
            Check(
                f"random labels: AND-mask with τ >= 0.2 stays near chance ({chance:.2f}), train accuracy "
                f"<= {chance + 0.1:.2f} (highest: τ={worst} {high[worst]:.3f})",
                all(v <= chance + 0.1 for v in high.values()),
                {"train_mean": high},
            )
        )
    if "0.0" in true_res and "0.2" in true_res:
        gen = {k: true_res[k]["test_mean"] for k in ("0.0", "0.2")}
        low = min(gen, key=gen.get)
        checks.append(
            Check(
                f"true labels: plain averaging and the AND-mask (τ=0.2) both generalise, test accuracy "
                f">= 0.8 (lowest: τ={low} {gen[low]:.3f})",
                all(v >= 0.8 for v in gen.values()),
                {"test_mean": gen},
            )
        )

    def draw(plt: Any) -> Any:
        fig, axes = plt.subplots(2, len(labels), figsize=(6 * len(labels), 8), squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for col, lab in enumerate(labels):
            ax, curves_ax = axes[0, col], axes[1, col]
            keys = list(results[lab])
            ts = [float(k) for k in keys]
            for key, style in (("train", "o-"), ("test", "s--")):
                means = [results[lab][k][f"{key}_mean"] for k in keys]
                stds = [results[lab][k][f"{key}_std"] for k in keys]
                ax.errorbar(ts, means, yerr=stds, fmt=style, capsize=3, label=f"{key} accuracy")
            ax.axhline(chance, color="gray", lw=0.8, ls="--", label="chance")
            if lab == "random" and ceilings:
                ax.axhline(
                    float(np.mean(ceilings)), color="gray", lw=0.8, ls=":", label="class-level ceiling"
                )
            ax.set_xlabel("AND-mask threshold τ (0 = plain averaging)")
            ax.set_ylabel("final accuracy")
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{data.name}: {lab} training labels, one environment per example", fontsize=10)
            ax.legend(fontsize=8)
            for i, k in enumerate(keys):
                runs = results[lab][k]["curves"]
                epochs = runs[0]["epoch"]
                c = colors[i % len(colors)]
                curves_ax.plot(
                    epochs, np.mean([r["train"] for r in runs], axis=0), "-", color=c, label=f"τ={k}"
                )
                curves_ax.plot(epochs, np.mean([r["test"] for r in runs], axis=0), "--", color=c)
            curves_ax.axhline(chance, color="gray", lw=0.8, ls="--")
            curves_ax.set_xlabel("epoch")
            curves_ax.set_ylabel("accuracy (solid: train, dashed: test)")
            curves_ax.set_ylim(0, 1.05)
            curves_ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        return fig

    if preset_name == "quick":
        notes.append(
            "quick preset: fewer training examples and epochs and τ in {0, 0.2} only; the claims' "
            "thresholds are stated for the default run, compare the ordering here"
        )
    config = {
        "preset": preset_name,
        "dataset": data.name,
        "n_train": len(data.train_x),
        "n_test": len(data.test_x),
        "setting": dataclasses.asdict(setting),
        "thresholds": [float(t) for t in thresholds],
        "labels": list(labels),
        "seeds": list(seeds),
        "backend": backend,
        "device": device,
    }
    return Report("memorization", config, results, checks, table, draw, notes)
