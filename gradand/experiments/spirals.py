"""The paper's synthetic task (§3, App. B): an invariant spiral mechanism and per-environment shortcuts.

Every example has ``2 + shortcut_dims`` features:

- two **spiral** features: a point on one of two interleaved spirals (one per
  label), ``radius ~ U(0.08, 1)``, ``angle = 2π · revolutions · radius + π · label``,
  with a little radial noise. The same rule holds in every environment: it is
  the invariant mechanism, but a non-linear one, so it is hard to learn;
- ``shortcut_dims`` **shortcut** features: environment ``e`` draws one random
  vector ``s_e ~ N(0, shortcut_scale² I)`` and every example of ``e`` carries
  ``s_e · (2·label - 1)``. Inside one environment the shortcut is perfectly
  predictive, and linearly so (``sign(s_e · x) = 2·label - 1``), but each
  environment uses a different direction, so the shortcuts are useless across
  environments. At test time the shortcut features are random per example.

A model that sews the environments' shortcuts into a patchwork reaches
perfect training accuracy and chance test accuracy; only a model of the
spirals generalises. This module builds the data and holds the presets; the
training loop is :func:`gradand.experiments.training.train_classifier`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import numpy as np

from gradand.experiments import TRAINING_MODULES
from gradand.experiments._distribution import Distribution, distribution
from gradand.experiments._parallel import run_many
from gradand.experiments.reference_spirals import (
    REFERENCE_INIT_SEED,
    REFERENCE_LOOP_METHODS,
    ReferenceSpiralsSetting,
    train_reference_loop,
)
from gradand.experiments.training import MLPSpec, train_classifier

__all__ = [
    "BASELINES",
    "LOOPS",
    "METHODS",
    "PRESETS",
    "SUCCESS",
    "SpiralsData",
    "SpiralsSetting",
    "TrainSetting",
    "check_reference_loop",
    "claims",
    "combiner_from",
    "make_spirals",
    "preset",
    "run",
]


class SpiralsData(NamedTuple):
    """Train environments and a test set of the spirals task (float32 arrays).

    Attributes:
        train_x: (E, n, 2 + d) inputs: spiral features first, then shortcut features.
        train_y: (E, n) labels in {0., 1.}.
        test_x: (n_test, 2 + d) inputs whose shortcut features are random per example.
        test_y: (n_test,) labels.
        shortcuts: (E, d) the environments' shortcut vectors ``s_e``.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    shortcuts: np.ndarray


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _check_nonneg(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


def _spiral_points(
    rng: np.random.Generator, labels: np.ndarray, revolutions: float, noise: float
) -> np.ndarray:
    radius = rng.uniform(0.08, 1.0, labels.shape[0])
    angle = 2.0 * math.pi * revolutions * radius + math.pi * labels
    radius = radius + rng.uniform(-noise, noise, labels.shape[0])
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def _balanced_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    labels = np.arange(n) % 2
    rng.shuffle(labels)
    return labels.astype(np.float64)


def make_spirals(
    *,
    n_envs: int = 16,
    examples_per_env: int = 1024,
    n_test: int = 2000,
    shortcut_dims: int = 8,
    shortcut_scale: float = 1.0,
    revolutions: float = 3.0,
    noise: float = 0.02,
    seed: int = 0,
) -> SpiralsData:
    """Generate the spirals task: ``n_envs`` training environments and a test set.

    Labels are balanced (half of each environment, and of the test set, is
    label 1; the extra example of an odd count is label 0). The spiral
    features are scaled to unit standard deviation by the training set's
    standard deviation, the same constant for the test set. The shortcut
    vectors have the same scale at training and test time, so only their
    relation to the label changes.

    Args:
        n_envs: number of training environments (≥ 1).
        examples_per_env: examples per environment (≥ 2).
        n_test: test examples (≥ 2).
        shortcut_dims: shortcut dimensions d (≥ 0; 0 leaves only the spirals).
        shortcut_scale: standard deviation of the shortcut vectors' entries.
        revolutions: turns of each spiral (> 0).
        noise: half-width of the uniform radial noise.
        seed: seed of everything random here.

    Returns:
        :class:`SpiralsData` (float32).

    Example:
        >>> import numpy as np
        >>> from gradand.experiments.spirals import make_spirals
        >>> data = make_spirals(n_envs=3, examples_per_env=10, n_test=6, shortcut_dims=4, seed=0)
        >>> data.train_x.shape, data.train_y.shape, data.test_x.shape
        ((3, 10, 6), (3, 10), (6, 6))
        >>> s = data.train_x[1, :, 2:] @ data.shortcuts[1]  # the shortcut decides the label in env 1
        >>> bool(np.all((s > 0) == (data.train_y[1] == 1)))
        True
    """
    n_envs = _check_int("n_envs", n_envs, 1)
    examples_per_env = _check_int("examples_per_env", examples_per_env, 2)
    n_test = _check_int("n_test", n_test, 2)
    shortcut_dims = _check_int("shortcut_dims", shortcut_dims, 0)
    shortcut_scale = _check_nonneg("shortcut_scale", shortcut_scale)
    noise = _check_nonneg("noise", noise)
    revolutions = _check_nonneg("revolutions", revolutions)
    if revolutions == 0:
        raise ValueError("revolutions must be > 0; got 0")
    seed = _check_int("seed", seed, 0)
    if noise >= 0.08:
        raise ValueError(f"noise must be < 0.08 (the smallest radius); got {noise}")

    root = np.random.default_rng(seed)
    shortcut_rng, train_rng, test_rng = root.spawn(3)
    shortcuts = shortcut_scale * shortcut_rng.standard_normal((n_envs, shortcut_dims))

    train_y = np.stack([_balanced_labels(train_rng, examples_per_env) for _ in range(n_envs)])
    spirals = _spiral_points(train_rng, train_y.reshape(-1), revolutions, noise)
    scale = spirals.std(axis=0)
    spirals = (spirals / scale).reshape(n_envs, examples_per_env, 2)
    signs = 2.0 * train_y - 1.0
    train_short = signs[:, :, None] * shortcuts[:, None, :]
    train_x = np.concatenate([spirals, train_short], axis=2)

    test_y = _balanced_labels(test_rng, n_test)
    test_spirals = _spiral_points(test_rng, test_y, revolutions, noise) / scale
    test_short = shortcut_scale * test_rng.standard_normal((n_test, shortcut_dims))
    test_x = np.concatenate([test_spirals, test_short], axis=1)

    f32 = np.float32
    return SpiralsData(
        train_x.astype(f32),
        train_y.astype(f32),
        test_x.astype(f32),
        test_y.astype(f32),
        shortcuts.astype(f32),
    )


@dataclasses.dataclass(frozen=True)
class SpiralsSetting:
    """Parameters of :func:`make_spirals` (the data side of a preset)."""

    n_envs: int = 16
    examples_per_env: int = 1024
    n_test: int = 2000
    shortcut_dims: int = 8
    shortcut_scale: float = 1.0
    revolutions: float = 3.0
    noise: float = 0.02

    def make(self, seed: int) -> SpiralsData:
        """The data for one seed.

        Example:
            >>> from gradand.experiments.spirals import SpiralsSetting
            >>> SpiralsSetting(n_envs=2, examples_per_env=4, n_test=4).make(0).train_x.shape
            (2, 4, 10)
        """
        return make_spirals(**dataclasses.asdict(self), seed=seed)


@dataclasses.dataclass(frozen=True)
class TrainSetting:
    """The training side of a preset (the reference code's ``run_synthetic.py`` defaults).

    An MLP with ``hidden_layers`` LeakyReLU layers of ``hidden_units``
    (Kaiming-normal weights, biases 0.01), binary cross-entropy on one logit,
    Adam with L2 ``weight_decay`` added to the combined gradient (so it acts on
    masked components too, as in the reference code), ``batch_size`` examples
    per environment and step, all environments in every step, ``epochs``
    passes over the data, learning rate × ``lr_decay`` after ``lr_milestone``
    of the epochs.

    The regularisers the paper compares (each with plain averaging) use
    ``dropout``, batch norm, ``l1`` (``l1 · sign(θ)`` added to the gradient)
    and ``l2`` (this weight decay instead of ``weight_decay``).

    Seeding and evaluation: ``init_seed`` initialises the model and
    ``shuffle_seed`` draws the batches; ``None`` (gradand's presets) uses the
    run's seed for both, so a seed changes data, initialisation and batches;
    the reference fixes both (:data:`~gradand.experiments.reference_spirals.REFERENCE_INIT_SEED`),
    so its seed changes only the data. ``evaluate="end"`` reports accuracies
    after the last epoch; ``"start"`` reports them as the reference logs its
    test accuracy, at the start of an epoch: after ``epochs - 1`` epochs (the
    accuracies after the last epoch are kept too, as ``at_end``).

    Example:
        >>> from gradand.experiments.spirals import TrainSetting
        >>> TrainSetting(epochs=1, evaluate="start")
        Traceback (most recent call last):
        ...
        ValueError: epochs must be >= 2 with evaluate='start' (accuracies after epochs - 1); got 1
    """

    hidden_units: int = 256
    hidden_layers: int = 3
    epochs: int = 150
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 1e-3
    lr_milestone: float = 0.75
    lr_decay: float = 0.1
    threshold: float = 1.0
    dropout: float = 0.5
    l1: float = 1e-4
    l2: float = 1e-2
    sand_threshold: float = 0.5
    sand_k: float = 10.0
    eval_every: int = 5
    init_seed: int | None = None
    shuffle_seed: int | None = None
    evaluate: str = "end"

    def __post_init__(self) -> None:
        if self.evaluate not in ("end", "start"):
            raise ValueError(f"evaluate must be 'end' or 'start'; got {self.evaluate!r}")
        _check_int("epochs", self.epochs, 1)
        if self.evaluate == "start" and self.epochs < 2:
            raise ValueError(
                f"epochs must be >= 2 with evaluate='start' (accuracies after epochs - 1); got {self.epochs}"
            )
        for name in ("init_seed", "shuffle_seed"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0)

    def methods(self) -> dict[str, dict[str, Any]]:
        """Each method's combiner name and model/regulariser options.

        Example:
            >>> from gradand.experiments.spirals import TrainSetting
            >>> list(TrainSetting().methods())
            ['mean', 'dropout', 'batch_norm', 'l1', 'l2', 'and_mask', 'geometric_mean', 'sand_mask']
        """
        base = {"dropout": 0.0, "batch_norm": False, "l1": 0.0, "weight_decay": self.weight_decay}
        t = self.threshold
        return {
            "mean": {**base, "combiner": ("mean", {})},
            "dropout": {**base, "combiner": ("mean", {}), "dropout": self.dropout},
            "batch_norm": {**base, "combiner": ("mean", {}), "batch_norm": True},
            "l1": {**base, "combiner": ("mean", {}), "l1": self.l1},
            "l2": {**base, "combiner": ("mean", {}), "weight_decay": self.l2},
            "and_mask": {**base, "combiner": ("and_mask", {"threshold": t})},
            "geometric_mean": {**base, "combiner": ("geometric_mean", {"threshold": t})},
            "sand_mask": {
                **base,
                "combiner": ("sand_mask", {"threshold": self.sand_threshold, "k": self.sand_k}),
            },
        }


#: Method names, in the order the CLI reports them.
METHODS: tuple[str, ...] = tuple(TrainSetting().methods())

#: The data side of a preset: gradand's generator or the reference's.
DataSetting = SpiralsSetting | ReferenceSpiralsSetting

#: Presets (``docs/results.md`` says how they differ):
#:
#: - ``reference``: the reference experiment (``run_synthetic.py``): its data generator
#:   (:mod:`~gradand.experiments.reference_spirals`: its fixed test set, per-environment
#:   normalisation, i.i.d. labels), its fixed initialisation and shuffling seed (the run's seed
#:   changes only the data), its evaluation (the test accuracy after ``epochs - 1`` epochs), its
#:   sizes and optimiser; trained through gradand's loop.
#: - ``gradand``: the same sizes and training with gradand's own generator
#:   (:func:`make_spirals`: balanced labels, pooled normalisation, a test set per seed) and the
#:   run's seed for data, initialisation and batches; accuracies after the last epoch.
#: - ``paper``: gradand's generator at App. B's sizes (32 environments × 1280, 32 dimensions).
#: - ``quick``: gradand's generator, small (seconds; tests and smoke runs).
PRESETS: dict[str, tuple[DataSetting, TrainSetting]] = {
    "reference": (
        ReferenceSpiralsSetting(),
        TrainSetting(init_seed=REFERENCE_INIT_SEED, shuffle_seed=REFERENCE_INIT_SEED, evaluate="start"),
    ),
    "gradand": (SpiralsSetting(), TrainSetting()),
    "paper": (
        SpiralsSetting(n_envs=32, examples_per_env=1280, n_test=2000, shortcut_dims=32),
        TrainSetting(),
    ),
    "quick": (
        SpiralsSetting(n_envs=16, examples_per_env=256, n_test=500, shortcut_dims=8, revolutions=1.0),
        TrainSetting(hidden_units=64, epochs=60, batch_size=64, eval_every=10),
    ),
}


def preset(name: str) -> tuple[DataSetting, TrainSetting]:
    """The (data, training) settings of a named preset.

    Example:
        >>> from gradand.experiments.spirals import preset
        >>> data, train = preset("reference")
        >>> type(data).__name__, data.n_envs, data.examples_per_env, data.shortcut_dims, train.epochs
        ('ReferenceSpiralsSetting', 16, 1024, 8, 150)
        >>> train.init_seed, train.shuffle_seed, train.evaluate
        (0, 0, 'start')
        >>> type(preset("gradand")[0]).__name__
        'SpiralsSetting'
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
    return PRESETS[name]


def combiner_from(spec: tuple[str, dict[str, Any]]) -> Any:
    """A gradand combiner from a ``(name, kwargs)`` spec (rescaled, as in the reference runs).

    Example:
        >>> from gradand.experiments.spirals import combiner_from
        >>> combiner_from(("and_mask", {"threshold": 1.0}))
        AndMask(threshold=1.0, rescale=True)
    """
    from gradand._combiners import AndMask, GeometricMean, Mean, SandMask

    name, kwargs = spec
    table = {"mean": Mean, "and_mask": AndMask, "geometric_mean": GeometricMean, "sand_mask": SandMask}
    if name not in table:
        raise ValueError(f"unknown combiner {name!r}; expected one of {sorted(table)}")
    return table[name](**kwargs)


#: The averaging baselines (plain averaging and the regularisers the paper compares).
BASELINES: tuple[str, ...] = ("mean", "dropout", "batch_norm", "l1", "l2")


#: The training loops a run can use: gradand's (:func:`~gradand.experiments.training.fit`, any
#: backend) and the reference's, re-implemented
#: (:func:`~gradand.experiments.reference_spirals.train_reference_loop`, PyTorch on the CPU).
LOOPS: tuple[str, ...] = ("gradand", "reference")

#: A run succeeds when its test accuracy is at least this.
SUCCESS: float = 0.95


def _zeroed(x: np.ndarray) -> np.ndarray:
    """``x`` with the shortcut features (every column after the first two) set to 0."""
    out = x.copy()
    out[..., 2:] = 0
    return out


def _train(
    backend: str,
    data: SpiralsData,
    train: TrainSetting,
    spec: dict[str, Any],
    *,
    seed: int,
    init_seed: int | None = None,
    device: str,
    show_progress: bool,
    desc: str,
) -> dict[str, Any]:
    """One run of gradand's loop: the MLP from ``init_seed`` (default ``seed``), batches from ``seed``.

    Evaluates the training set, the test set and the test set with the shortcut
    features zeroed (``test_no_shortcuts``); with ``train.evaluate == "start"``
    ``final`` holds the accuracies after ``epochs - 1`` epochs and ``at_end``
    those after the last.
    """
    d = data.train_x.shape[-1]
    start = train.evaluate == "start"
    out = train_classifier(
        MLPSpec(
            in_features=d,
            out_features=1,
            hidden_units=train.hidden_units,
            hidden_layers=train.hidden_layers,
            dropout=spec["dropout"],
            batch_norm=spec["batch_norm"],
        ),
        backend=backend,
        train_x=data.train_x,
        train_y=data.train_y,
        eval_sets={
            "train": (data.train_x.reshape(-1, d), data.train_y.reshape(-1)),
            "test": (data.test_x, data.test_y),
            "test_no_shortcuts": (_zeroed(data.test_x), data.test_y),
        },
        combiner=combiner_from(spec["combiner"]),
        loss="bce",
        epochs=train.epochs,
        batch_size=train.batch_size,
        lr=train.lr,
        weight_decay=spec["weight_decay"],
        l1=spec["l1"],
        lr_milestone=train.lr_milestone,
        lr_decay=train.lr_decay,
        # "start": evaluated after epochs - 1 epochs (what the reference reports) and at the end
        eval_every=train.epochs - 1 if start else train.eval_every,
        seed=seed,
        init_seed=init_seed,
        device=device,
        show_progress=show_progress,
        desc=desc,
    )
    del out["model"]  # results cross process boundaries; a framework's model need not pickle
    out["at_end"] = dict(out["final"])
    if start:
        k = out["curve"]["epoch"].index(train.epochs - 1)
        out["final"] = {name: out["curve"][name][k] for name in out["final"]}
    return out


#: Backends that can train the spirals task, and their training function.
TRAINERS = {name: functools.partial(_train, name) for name in TRAINING_MODULES}


def check_reference_loop(train: TrainSetting, methods: tuple[str, ...], backend: str, device: str) -> None:
    """``ValueError`` unless the reference loop can run ``methods`` with ``train`` as given.

    Example:
        >>> from gradand.experiments.spirals import TrainSetting, check_reference_loop
        >>> check_reference_loop(TrainSetting(), ("mean", "and_mask"), "torch", "cpu")
        >>> check_reference_loop(TrainSetting(), ("sand_mask",), "torch", "cpu")
        Traceback (most recent call last):
        ...
        ValueError: the reference loop cannot train ['sand_mask'] (it trains mean, and_mask, geometric_mean)
    """
    if backend != "torch" or device != "cpu":
        raise ValueError(
            f"the reference loop runs on PyTorch on the CPU; got backend {backend!r}, device {device!r}"
        )
    if (train.lr_milestone, train.lr_decay) != (0.75, 0.1):
        raise ValueError("the reference loop decays the learning rate x 0.1 after 3/4 of the epochs only")
    table = train.methods()
    other = [m for m in methods if table[m]["combiner"][0] not in REFERENCE_LOOP_METHODS]
    if other:
        raise ValueError(
            f"the reference loop cannot train {other} (it trains {', '.join(REFERENCE_LOOP_METHODS)})"
        )


def _run_reference_loop(
    data: SpiralsData, train: TrainSetting, spec: dict[str, Any], *, seed: int, show_progress: bool, desc: str
) -> dict[str, Any]:
    """One run of the re-implemented reference loop (its one seed: ``init_seed``, else ``seed``)."""
    name, kwargs = spec["combiner"]
    out = train_reference_loop(
        data,
        method=name,
        threshold=kwargs.get("threshold", 0.0),
        epochs=train.epochs,
        batch_size=train.batch_size,
        lr=train.lr,
        weight_decay=spec["weight_decay"],
        l1=spec["l1"],
        dropout=spec["dropout"],
        batch_norm=spec["batch_norm"],
        hidden_units=train.hidden_units,
        hidden_layers=train.hidden_layers,
        seed=seed if train.init_seed is None else train.init_seed,
        test_batch_size=min(1000, len(data.test_y)),
        show_progress=show_progress,
        desc=desc,
    )
    if train.evaluate == "end":
        out["final"] = dict(out["at_end"])
    return out


def _run_one(
    backend: str,
    setting: DataSetting,
    train: TrainSetting,
    method: str,
    seed: int,
    device: str,
    show_progress: bool,
    loop: str = "gradand",
) -> dict[str, Any]:
    """One (method, seed) run; module-level so that worker processes can run it."""
    data, spec, desc = setting.make(seed), train.methods()[method], f"spirals {method} seed {seed}"
    if loop == "reference":
        return _run_reference_loop(data, train, spec, seed=seed, show_progress=show_progress, desc=desc)
    return _train(
        backend,
        data,
        train,
        spec,
        seed=seed if train.shuffle_seed is None else train.shuffle_seed,
        init_seed=seed if train.init_seed is None else train.init_seed,
        device=device,
        show_progress=show_progress,
        desc=desc,
    )


def _interval(d: Distribution) -> tuple[float, float]:
    """The interval for the mean; with one value (no interval), the value itself."""
    return (d.mean, d.mean) if d.low is None or d.high is None else (d.low, d.high)


def claims(per_method: dict[str, dict[str, Any]], *, threshold: float = 1.0) -> list[Any]:
    """The paper's claims checked on the distributions over seeds (the rule, stated once).

    ``per_method[m]`` holds :class:`~gradand.experiments._distribution.Distribution` s
    ``"test"`` and ``"train"`` (over the same seeds). The rule:

    1. the AND-mask generalises: the lower end of the 95 % interval of its mean test
       accuracy is ≥ 0.9;
    2. the AND-mask, and 3. the geometric mean, succeed (test ≥ :data:`SUCCESS`) more often
       than plain averaging: their success rate's 95 % Wilson interval lies entirely above
       averaging's (with ``n`` seeds this needs ``n ≥ 5`` even at n/n against 0/n);
    4. plain averaging and every regulariser stay near chance: the upper end of each one's
       interval is ≤ 0.65;
    5. ... while fitting the training set: each one's mean train accuracy is ≥ 0.95.

    A claim whose methods were not run is not checked. With one seed the "interval" of a
    mean is the value itself.

    Example:
        >>> from gradand.experiments._distribution import distribution
        >>> from gradand.experiments.spirals import claims
        >>> runs = {"mean": {"test": distribution([0.5] * 6), "train": distribution([1.0] * 6)},
        ...         "and_mask": {"test": distribution([1.0] * 6), "train": distribution([1.0] * 6)}}
        >>> [c.passed for c in claims(runs)]
        [True, True, True, True]
    """
    from gradand.experiments._report import Check

    checks = []
    if "and_mask" in per_method:
        d = per_method["and_mask"]["test"]
        low, high = _interval(d)
        checks.append(
            Check(
                f"AND-mask (τ={threshold}) test accuracy >= 0.9: lower end of the 95% interval of its "
                f"mean (measured {d.mean:.3f} [{low:.3f}, {high:.3f}], n={d.n})",
                low >= 0.9,
                {"and_mask_test": d.to_json()},
            )
        )
    if "mean" in per_method:
        base = per_method["mean"]["test"]
        for m, label in (("and_mask", "AND-mask"), ("geometric_mean", "geometric mean")):
            if m not in per_method:
                continue
            d = per_method[m]["test"]
            checks.append(
                Check(
                    f"{label} succeeds (test >= {SUCCESS}) more often than plain averaging: "
                    f"{d.successes}/{d.n} [{d.success_low:.2f}, {d.success_high:.2f}] vs "
                    f"{base.successes}/{base.n} [{base.success_low:.2f}, {base.success_high:.2f}] "
                    f"(95% Wilson intervals disjoint)",
                    d.success_low > base.success_high,
                    {m: d.to_json(), "mean": base.to_json()},
                )
            )
    base = [m for m in BASELINES if m in per_method]
    if base:
        highs = {m: _interval(per_method[m]["test"])[1] for m in base}
        trains = {m: per_method[m]["train"].mean for m in base}
        worst = max(highs, key=highs.get)
        checks.append(
            Check(
                f"plain averaging and every regulariser stay near chance: upper end of the 95% interval "
                f"of the test accuracy <= 0.65 (highest: {worst} {highs[worst]:.3f})",
                all(v <= 0.65 for v in highs.values()),
                {"test_high": highs},
            )
        )
        low = min(trains, key=trains.get)
        checks.append(
            Check(
                f"... while fitting the training set: mean train accuracy >= 0.95 "
                f"(lowest: {low} {trains[low]:.3f})",
                all(v >= 0.95 for v in trains.values()),
                {"train_mean": trains},
            )
        )
    return checks


def run(
    setting: DataSetting,
    train: TrainSetting,
    *,
    methods: tuple[str, ...] = METHODS,
    seeds: tuple[int, ...] = (0, 1, 2),
    backend: str = "torch",
    device: str = "cpu",
    show_progress: bool = True,
    preset_name: str = "custom",
    log: Any = None,
    jobs: int | None = 1,
    threads: int | None = None,
    loop: str = "gradand",
) -> Any:
    """Train every method on every seed; report distributions over seeds and test the paper's claims.

    Returns a :class:`gradand.experiments._report.Report`. Per method it holds
    the per-seed accuracies and their distributions
    (:func:`~gradand.experiments._distribution.distribution`: mean with a 95 %
    Student-t interval, success rate — test ≥ :data:`SUCCESS` — with a 95 %
    Wilson interval) of the train accuracy, the test accuracy and the test
    accuracy with the shortcut features zeroed (``test_no_shortcuts``: has
    the model learnt the spirals?). :func:`claims` states the rule the claims
    are checked by.

    Seed ``s`` generates the data (``setting.make(s)``); it also initialises
    the model and draws the batches unless ``train`` fixes ``init_seed`` /
    ``shuffle_seed`` (the ``reference`` preset does). All methods see the same
    data and initialisation for a seed. ``loop="reference"`` trains with the
    re-implemented reference loop instead of gradand's
    (:func:`~gradand.experiments.reference_spirals.train_reference_loop`).
    ``log(message)``, when given, receives one line per finished run.

    The runs (method × seed) are independent: ``jobs`` worker processes run
    them side by side, each with ``threads`` CPU threads
    (:func:`gradand.experiments._parallel.worker_plan`: ``jobs=None`` is one
    worker per CPU on ``cpu``, ``threads=None`` splits the CPUs between
    workers); the per-environment methods start first. A run's numbers
    depend on its thread count, not on which worker runs it. With several
    workers, per-run progress bars are replaced by one bar over runs.

    Example:
        >>> from gradand.experiments.spirals import SpiralsSetting, TrainSetting, run
        >>> data = SpiralsSetting(n_envs=4, examples_per_env=16, n_test=16)
        >>> report = run(data, TrainSetting(hidden_units=8, epochs=1, batch_size=8), methods=("mean",),
        ...              seeds=(0, 1), show_progress=False)
        >>> sorted(report.results["methods"]["mean"]["distribution"])
        ['test', 'test_no_shortcuts', 'train']
    """
    from gradand.experiments._report import Report, format_table, mean_std

    if backend not in TRAINERS:
        raise ValueError(
            f"backend {backend!r} is not supported for the spirals experiment; use one of {sorted(TRAINERS)}"
        )
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {list(LOOPS)}; got {loop!r}")
    table_methods = train.methods()
    unknown = [m for m in methods if m not in table_methods]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {list(table_methods)}; got {list(methods)}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed; got none")
    if loop == "reference":
        check_reference_loop(train, methods, backend, device)
    keys = ("train", "test", "test_no_shortcuts")
    per_method: dict[str, dict[str, Any]] = {
        m: {
            "train_acc": [],
            "test_acc": [],
            "test_no_shortcuts_acc": [],
            "at_end": [],
            "survivor_fraction": [],
            "curves": [],
            "seconds": [],
        }
        for m in methods
    }
    runs = [(seed, m) for seed in seeds for m in methods]

    def line(run: tuple[int, str], out: dict[str, Any]) -> str:
        final = out["final"]
        return (
            f"spirals {run[1]} seed {run[0]}: train {final['train']:.3f} test {final['test']:.3f} "
            f"test without shortcuts {final['test_no_shortcuts']:.3f} ({out['seconds']:.1f} s)"
        )

    by_run, workers, threads = run_many(
        _run_one,
        runs,
        lambda run, inner: (backend, setting, train, run[1], run[0], device, inner, loop),
        jobs=jobs, threads=threads, device=device, backend=backend, desc="spirals runs",
        show_progress=show_progress, inner_progress=True, log=log, line=line,
        # the per-environment methods first (the longest runs, and the results wanted first)
        first=lambda run: table_methods[run[1]]["combiner"][0] == "mean",
    )  # fmt: skip
    for seed, m in runs:
        out, r = by_run[(seed, m)], per_method[m]
        for key in keys:
            r[f"{key}_acc"].append(out["final"][key])
        r["at_end"].append(out["at_end"])
        r["survivor_fraction"].append(out["survivor_fraction"])
        r["curves"].append(out["curve"])
        r["seconds"].append(out["seconds"])
    dists: dict[str, dict[str, Distribution]] = {}
    rows = []
    for m, r in per_method.items():
        dists[m] = {key: distribution(r[f"{key}_acc"], threshold=SUCCESS) for key in keys}
        r["distribution"] = {key: d.to_json() for key, d in dists[m].items()}
        r["train_mean"], r["train_std"] = mean_std(r["train_acc"])
        r["test_mean"], r["test_std"] = mean_std(r["test_acc"])
        name, kwargs = table_methods[m]["combiner"]
        label = name + ("" if not kwargs else "(" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")")
        test, zeroed = dists[m]["test"], dists[m]["test_no_shortcuts"]

        def cell(d: Distribution) -> str:
            return f"{d.mean:.3f}" + ("" if d.half_width is None else f" ± {d.half_width:.3f}")

        rows.append(
            [
                m,
                label,
                cell(dists[m]["train"]),
                cell(test),
                f"{test.successes}/{test.n} [{test.success_low:.2f}, {test.success_high:.2f}]",
                cell(zeroed),
                f"{float(np.mean(r['survivor_fraction'])):.3f}",
            ]
        )
    table = format_table(
        [
            "method",
            "combiner",
            "train acc",
            "test acc (95% CI)",
            f"test >= {SUCCESS} (95% CI)",
            "test, shortcuts zeroed",
            "grad kept",
        ],
        rows,
    )
    checks = claims(dists, threshold=train.threshold)

    def draw(plt: Any) -> Any:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [2, 1]})
        names = list(per_method)
        xs = np.arange(len(names))
        jitter = np.random.default_rng(0)
        for i, m in enumerate(names):
            for off, key, color, marker in (
                (-0.17, "test", "C0", "o"),
                (0.17, "test_no_shortcuts", "C2", "s"),
            ):
                d = dists[m][key]
                ax1.scatter(i + off + jitter.uniform(-0.06, 0.06, d.n), d.values, s=10, color=color,
                            marker=marker, alpha=0.5, label=None if i else key)  # fmt: skip
                low, high = _interval(d)
                ax1.errorbar(i + off, d.mean, yerr=[[d.mean - low], [high - d.mean]], fmt="_", color="k",
                             capsize=4, ms=14)  # fmt: skip
        ax1.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax1.axhline(SUCCESS, color="C3", lw=0.8, ls=":")
        ax1.set_xticks(xs, names, rotation=30, ha="right")
        ax1.set_ylim(0.3, 1.03)
        ax1.set_ylabel("accuracy per seed; mean and 95% interval")
        ax1.set_title(f"spirals ({preset_name}, {loop} loop), {len(seeds)} seed(s)")
        ax1.legend(loc="lower left", fontsize=8)
        rates = [dists[m]["test"].success_rate for m in names]
        lows = [dists[m]["test"].success_low for m in names]
        highs = [dists[m]["test"].success_high for m in names]
        ax2.bar(xs, rates, 0.6, color="C0", alpha=0.7)
        ax2.errorbar(xs, rates, yerr=[np.subtract(rates, lows), np.subtract(highs, rates)], fmt="none",
                     ecolor="k", capsize=4)  # fmt: skip
        ax2.set_xticks(xs, names, rotation=30, ha="right")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel(f"success rate (test >= {SUCCESS}), 95% Wilson interval")
        fig.tight_layout()
        return fig

    notes = []
    if not preset_name.startswith("reference"):
        notes.append(
            f"the paper's thresholds (AND-mask test >= 0.9, baselines <= 0.65) are stated for the "
            f"reference preset; this run used the {preset_name!r} setting"
        )
    if len(seeds) < 5 and "mean" in per_method and ({"and_mask", "geometric_mean"} & set(per_method)):
        notes.append(
            f"{len(seeds)} seed(s): the success-rate comparison needs at least 5 seeds to pass "
            "(95% Wilson intervals of n/n and 0/n overlap below that)"
        )
    if train.evaluate == "start":
        notes.append(
            f"accuracies after {train.epochs - 1} of {train.epochs} epochs (the reference logs the test "
            "accuracy at the start of each epoch); those after the last epoch are in the JSON (at_end)"
        )
    config = {
        "preset": preset_name,
        "generator": "reference" if isinstance(setting, ReferenceSpiralsSetting) else "gradand",
        "data": dataclasses.asdict(setting),
        "train": dataclasses.asdict(train),
        "loop": loop,
        "methods": {m: table_methods[m] for m in methods},
        "seeds": list(seeds),
        "success_threshold": SUCCESS,
        "backend": backend,
        "device": device,
        "workers": workers,
        "threads_per_worker": threads,
    }
    return Report("spirals", config, {"methods": per_method}, checks, table, draw, notes)
