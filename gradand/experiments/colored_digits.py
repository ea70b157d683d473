"""Colored digits: IRM's Colored MNIST recipe on scikit-learn's bundled 8×8 digits (no download).

A negative control for the AND-mask. It follows the recipe of Arjovsky et al., *Invariant
Risk Minimization* (2019), scaled down to the 1797 digits that ship with scikit-learn:

1. A seeded permutation splits the images into ``n_train`` training images and a held-out
   test split (the rest); no test image is ever in a training environment.
2. Binary label: ``digit < 5``, then flipped with probability ``label_noise`` (0.25): the
   shape of the digit predicts the label 75 % of the time, in every environment.
3. Colour: a second binary variable that equals the (noisy) label except with probability
   ``p_e``; the image goes into colour channel ``colour`` and the other channel is zero.
   In training environment ``e``, ``p_e`` is spread evenly over ``color_noise`` (0.05 to
   0.25; the midpoint when there is one environment); in the test set ``p_e`` is
   ``test_color_noise`` (0.9). Colour predicts the label better than shape does during
   training (75–95 %) and is reversed at test time (10 %).
4. Every training environment reuses all ``n_train`` training images, each environment in
   its own random order and with its own fresh label noise and colours.

Inputs are flattened, channel first: ``x.reshape(-1, 2, 8, 8)`` gives the two-channel images
(channel 0 for colour 0, channel 1 for colour 1), pixels in [0, 1] (the digits' 0–16 divided
by 16). This shape suits the experiments' MLPs; reshape for a convolutional model.

Two controls:

- ``grayscale=True``: the image in *both* channels, so the input carries no colour (the
  input shape stays (128,) and the model need not change). Labels and images are those of
  the coloured data of the same seed.
- ``reversed_envs=k``: the last ``k`` training environments use ``1 - p_e`` instead of
  ``p_e``: their colour *disagrees* with the label most of the time, so the colour's gradient
  no longer has the same sign in every environment.

Every random draw is the same whatever ``grayscale`` and ``reversed_envs`` are, so a control
differs from the plain data of the same seed only in what the control changes.

The experiment (:func:`run`, ``gradand reproduce colored-digits``) trains averaging, the
AND-mask, the geometric mean and the IRMv1 and V-REx penalties on the same data, plus the two
controls, over many seeds (:class:`TrainSetting`, :data:`PRESETS`). Every environment's colour
correlates with the label the same way, so the colour's gradient has the same sign in every
environment: the AND-mask's sign test has nothing to veto, and it learns the colour as averaging
does. With one environment reversed the signs disagree and the mask can act.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "METHODS",
    "PRESETS",
    "SUCCESS",
    "ColoredDigits",
    "ColoredDigitsSetting",
    "TrainSetting",
    "color_flip_probabilities",
    "make_colored_digits",
    "preset",
    "run",
]

_SIDE = 8
_PIXELS = _SIDE * _SIDE
#: Images in scikit-learn's bundled digits.
_N_DIGITS = 1797


class ColoredDigits(NamedTuple):
    """Training environments and a test set of colored digits.

    Attributes:
        train_x: (E, n, 128) float32 inputs, two 8×8 channels flattened channel first.
        train_y: (E, n) float32 noisy labels in {0., 1.} (1: digit < 5, before the noise).
        test_x: (m, 128) float32 inputs of the held-out images.
        test_y: (m,) float32 noisy labels.
        color_flips: (E,) float64, each training environment's probability that the colour
            disagrees with the label (after any reversal).
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    color_flips: np.ndarray


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    bad = isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum
    if not bad and maximum is not None and value > maximum:
        bad = True
    if bad:
        expected = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {expected}; got {value!r}")
    return int(value)


def _check_probability(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or not 0 <= value <= 1
    ):
        raise ValueError(f"{name} must be a probability in [0, 1]; got {value!r}")
    return float(value)


def _check_range(value: Any) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"color_noise must be a pair (low, high) of probabilities; got {value!r}")
    low = _check_probability("color_noise[0]", value[0])
    high = _check_probability("color_noise[1]", value[1])
    if low > high:
        raise ValueError(f"color_noise must be (low, high) with low <= high; got {value!r}")
    return low, high


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def color_flip_probabilities(
    n_envs: int, color_noise: tuple[float, float] = (0.05, 0.25), reversed_envs: int = 0
) -> np.ndarray:
    """Each training environment's probability ``p_e`` that the colour disagrees with the label.

    Evenly spaced from ``color_noise[0]`` to ``color_noise[1]`` (the midpoint for one
    environment); the last ``reversed_envs`` environments get ``1 - p_e``.

    Example:
        >>> from gradand.experiments.colored_digits import color_flip_probabilities
        >>> color_flip_probabilities(5).round(3).tolist()
        [0.05, 0.1, 0.15, 0.2, 0.25]
        >>> color_flip_probabilities(5, reversed_envs=1).round(3).tolist()
        [0.05, 0.1, 0.15, 0.2, 0.75]
    """
    n_envs = _check_int("n_envs", n_envs, 1)
    low, high = _check_range(color_noise)
    reversed_envs = _check_int("reversed_envs", reversed_envs, 0, n_envs)
    flips = np.linspace(low, high, n_envs) if n_envs > 1 else np.array([(low + high) / 2])
    if reversed_envs:
        flips[n_envs - reversed_envs :] = 1.0 - flips[n_envs - reversed_envs :]
    return flips


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the digits dataset comes with scikit-learn: pip install 'gradand[experiments]'"
        ) from None
    bunch = load_digits()
    images = (bunch.data / 16.0).astype(np.float32)
    digits = bunch.target.astype(np.int64)
    if len(images) != _N_DIGITS:  # pragma: no cover - a different scikit-learn dataset
        raise RuntimeError(f"expected {_N_DIGITS} digits from scikit-learn; got {len(images)}")
    images.setflags(write=False)
    digits.setflags(write=False)
    return images, digits


def _colorize(
    rng: np.random.Generator,
    images: np.ndarray,
    digits: np.ndarray,
    *,
    label_noise: float,
    color_flip: float,
    grayscale: bool,
) -> tuple[np.ndarray, np.ndarray]:
    n = len(images)
    label_draw = rng.random(n)
    color_draw = rng.random(n)
    labels = (digits < 5) ^ (label_draw < label_noise)
    colors = labels ^ (color_draw < color_flip)
    x = np.zeros((n, 2, _PIXELS), np.float32)
    if grayscale:
        x[:, 0] = images
        x[:, 1] = images
    else:
        x[np.arange(n), colors.astype(np.int64)] = images
    return x.reshape(n, 2 * _PIXELS), labels.astype(np.float32)


def make_colored_digits(
    *,
    n_envs: int = 8,
    n_train: int = 1000,
    label_noise: float = 0.25,
    color_noise: tuple[float, float] = (0.05, 0.25),
    test_color_noise: float = 0.9,
    grayscale: bool = False,
    reversed_envs: int = 0,
    seed: int = 0,
) -> ColoredDigits:
    """Colored digits: ``n_envs`` training environments and a held-out test set.

    See the module docstring for the construction.

    Args:
        n_envs: number of training environments (≥ 1).
        n_train: images in the training split (1 to 1796); the remaining digits are the
            test set.
        label_noise: probability that a label is flipped (0.25 in IRM's recipe).
        color_noise: (low, high): the training environments' colour-flip probabilities
            are spread evenly over this range.
        test_color_noise: the test set's colour-flip probability (0.9: colour reversed).
        grayscale: put every image in both channels (no colour information).
        reversed_envs: how many training environments, counted from the last, use
            ``1 - p_e`` (0 to ``n_envs``).
        seed: seed of the split, the label noise and the colours (an integer ≥ 0).

    Returns:
        :class:`ColoredDigits`.

    Example:
        >>> import numpy as np
        >>> from gradand.experiments.colored_digits import make_colored_digits
        >>> data = make_colored_digits(n_envs=2, n_train=600, seed=0)
        >>> data.train_x.shape, data.train_y.shape, data.test_x.shape, data.color_flips.tolist()
        ((2, 600, 128), (2, 600), (1197, 128), [0.05, 0.25])
        >>> color = data.test_x.reshape(-1, 2, 64)[:, 1].any(axis=1)  # image in channel 1?
        >>> round(float(np.mean(color == data.test_y)), 1)  # test: colour agrees 10 % of the time
        0.1
    """
    n_envs = _check_int("n_envs", n_envs, 1)
    label_noise = _check_probability("label_noise", label_noise)
    flips = color_flip_probabilities(n_envs, color_noise, reversed_envs)
    test_color_noise = _check_probability("test_color_noise", test_color_noise)
    grayscale = _check_bool("grayscale", grayscale)
    seed = _check_int("seed", seed, 0)
    n_train = _check_int("n_train", n_train, 1, _N_DIGITS - 1)
    images, digits = _digits()

    split_rng, test_rng, *env_rngs = np.random.default_rng(seed).spawn(2 + n_envs)
    order = split_rng.permutation(len(images))
    train, test = order[:n_train], order[n_train:]
    xs, ys = [], []
    for rng, flip in zip(env_rngs, flips):
        own = train[rng.permutation(n_train)]
        x, y = _colorize(
            rng, images[own], digits[own], label_noise=label_noise, color_flip=flip, grayscale=grayscale
        )
        xs.append(x)
        ys.append(y)
    test_x, test_y = _colorize(
        test_rng,
        images[test],
        digits[test],
        label_noise=label_noise,
        color_flip=test_color_noise,
        grayscale=grayscale,
    )
    return ColoredDigits(np.stack(xs), np.stack(ys), test_x, test_y, flips)


@dataclasses.dataclass(frozen=True)
class ColoredDigitsSetting:
    """Parameters of :func:`make_colored_digits`; invalid values fail on construction.

    Example:
        >>> from gradand.experiments.colored_digits import ColoredDigitsSetting
        >>> data = ColoredDigitsSetting(n_envs=3, n_train=500).make(0)
        >>> data.train_x.shape, data.test_x.shape
        ((3, 500, 128), (1297, 128))
        >>> ColoredDigitsSetting(reversed_envs=9)
        Traceback (most recent call last):
        ...
        ValueError: reversed_envs must be an integer in [0, 8]; got 9
    """

    n_envs: int = 8
    n_train: int = 1000
    label_noise: float = 0.25
    color_noise: tuple[float, float] = (0.05, 0.25)
    test_color_noise: float = 0.9
    grayscale: bool = False
    reversed_envs: int = 0

    def __post_init__(self) -> None:
        color_flip_probabilities(self.n_envs, self.color_noise, self.reversed_envs)
        _check_int("n_train", self.n_train, 1, _N_DIGITS - 1)
        _check_probability("label_noise", self.label_noise)
        _check_probability("test_color_noise", self.test_color_noise)
        _check_bool("grayscale", self.grayscale)
        # a list would make the setting unhashable; keep the validated pair as a tuple
        object.__setattr__(self, "color_noise", tuple(float(v) for v in self.color_noise))

    def make(self, seed: int) -> ColoredDigits:
        """The data for one seed.

        Example:
            >>> from gradand.experiments.colored_digits import ColoredDigitsSetting
            >>> ColoredDigitsSetting(n_envs=2, grayscale=True).make(1).train_x.shape
            (2, 1000, 128)
        """
        return make_colored_digits(**dataclasses.asdict(self), seed=seed)


# --------------------------------------------------------------------------- the experiment


@dataclasses.dataclass(frozen=True)
class TrainSetting:
    """The training side of the colored-digits experiment (one setting for every method).

    An MLP of ``hidden_layers`` LeakyReLU layers of ``hidden_units`` on the flattened
    (128,) input, one logit, binary cross-entropy; Adam at ``lr`` for ``epochs`` passes,
    ``batch_size`` examples of every environment per step (the default, the whole
    environment, is IRM's full-batch Colored MNIST training: one step per epoch).
    The penalties (:class:`gradand.experiments.training.Penalty`) have weight 1 for the
    first ``anneal_fraction`` of the steps, then ``irm_weight`` or ``vrex_weight`` (the
    objective divided by it). No weight decay by default: the loop adds it after the
    penalised objective is divided by λ, which would make it λ times stronger for the
    penalised methods than for the others.

    ``low_threshold`` (τ = 0.75) lets 7 of 8 environments outvote the eighth; with 8
    environments τ = 0.8 would need all 8 (|votes| ≥ 6.4 of 8), the same mask as τ = 1.

    Why 2×64 units: the input has 128 features and the training split 1000 images.
    IRM's Colored MNIST MLP has about as many hidden units as inputs (390 for 392); half
    that here already fits the training environments (~0.86, the colour's accuracy) and
    keeps a run to a few seconds on one CPU thread, so ten seeds of every method take
    minutes.

    Example:
        >>> from gradand.experiments.colored_digits import TrainSetting
        >>> train = TrainSetting()
        >>> list(train.methods())[:4], train.anneal_steps(1000)
        (['mean', 'and_mask', 'and_mask_low', 'geometric_mean'], 75)
        >>> TrainSetting(lr=0)
        Traceback (most recent call last):
        ...
        ValueError: lr must be a finite number > 0; got 0
    """

    hidden_units: int = 64
    hidden_layers: int = 2
    epochs: int = 300
    batch_size: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    threshold: float = 1.0
    low_threshold: float = 0.75
    irm_weight: float = 1e4
    vrex_weight: float = 1e4
    anneal_fraction: float = 0.25
    reversed_envs: int = 1
    eval_every: int = 25

    def __post_init__(self) -> None:
        for name, minimum in (("hidden_units", 1), ("hidden_layers", 0), ("epochs", 1), ("batch_size", 1)):
            _check_int(name, getattr(self, name), minimum)
        _check_int("reversed_envs", self.reversed_envs, 0)
        _check_int("eval_every", self.eval_every, 1)
        for name in ("threshold", "low_threshold", "anneal_fraction"):
            _check_probability(name, getattr(self, name))
        for name in ("lr", "weight_decay", "irm_weight", "vrex_weight"):
            value = getattr(self, name)
            number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            if not number or not 0 <= value < math.inf or (name == "lr" and value == 0):
                low = "> 0" if name == "lr" else ">= 0"
                raise ValueError(f"{name} must be a finite number {low}; got {value!r}")

    def anneal_steps(self, n_train: int) -> int:
        """Steps with penalty weight 1: ``anneal_fraction`` of all steps for ``n_train`` examples.

        Example:
            >>> from gradand.experiments.colored_digits import TrainSetting
            >>> TrainSetting(epochs=100, batch_size=50).anneal_steps(200)
            100
        """
        steps = self.epochs * (n_train // min(self.batch_size, n_train))
        return int(self.anneal_fraction * steps)

    def methods(self) -> dict[str, dict[str, Any]]:
        """Each method: its data changes (a control), combiner and penalty (``(kind, weight)``).

        Example:
            >>> from gradand.experiments.colored_digits import TrainSetting
            >>> TrainSetting().methods()["reversed_and_mask"]
            {'data': {'reversed_envs': 1}, 'combiner': ('and_mask', {'threshold': 1.0}), 'penalty': None}
        """
        mean: dict[str, Any] = {"data": {}, "combiner": ("mean", {}), "penalty": None}
        and_mask = ("and_mask", {"threshold": self.threshold})
        reverse = {"reversed_envs": self.reversed_envs}
        return {
            "mean": mean,
            "and_mask": {**mean, "combiner": and_mask},
            "and_mask_low": {**mean, "combiner": ("and_mask", {"threshold": self.low_threshold})},
            "geometric_mean": {**mean, "combiner": ("geometric_mean", {"threshold": self.threshold})},
            "irm": {**mean, "penalty": ("irm", self.irm_weight)},
            "vrex": {**mean, "penalty": ("vrex", self.vrex_weight)},
            "grayscale": {**mean, "data": {"grayscale": True}},
            "reversed_mean": {**mean, "data": reverse},
            "reversed_and_mask": {**mean, "data": reverse, "combiner": and_mask},
        }


#: Method names, in the order the CLI reports them.
METHODS: tuple[str, ...] = tuple(TrainSetting().methods())

#: Presets: ``default`` (8 environments of the 1000 training images, 300 full-batch steps)
#: and ``quick`` (seconds, for tests and smoke runs).
PRESETS: dict[str, tuple[ColoredDigitsSetting, TrainSetting]] = {
    "default": (ColoredDigitsSetting(), TrainSetting()),
    "quick": (
        ColoredDigitsSetting(n_envs=4, n_train=400),
        TrainSetting(hidden_units=16, epochs=80, batch_size=400, lr=3e-3, eval_every=20),
    ),
}

#: A test accuracy at least this is a "success": above chance, so not the colour alone.
SUCCESS = 0.5


def preset(name: str) -> tuple[ColoredDigitsSetting, TrainSetting]:
    """The (data, training) settings of a named preset.

    Example:
        >>> from gradand.experiments.colored_digits import preset
        >>> data, train = preset("default")
        >>> data.n_envs, data.n_train, train.hidden_units, train.epochs
        (8, 1000, 64, 300)
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
    return PRESETS[name]


def _label(spec: dict[str, Any]) -> str:
    name, kwargs = spec["combiner"]
    text = name + ("" if not kwargs else "(" + ", ".join(f"τ={v:g}" for v in kwargs.values()) + ")")
    if spec["penalty"] is not None:
        kind, weight = spec["penalty"]
        text = {"irm": "IRMv1", "vrex": "V-REx"}[kind] + f"(λ={weight:g})"
    data = spec["data"]
    if data.get("grayscale"):
        text += ", grayscale"
    if data.get("reversed_envs"):
        text += f", {data['reversed_envs']} reversed"
    return text


def _run_one(
    backend: str,
    setting: ColoredDigitsSetting,
    train: TrainSetting,
    method: str,
    seed: int,
    device: str,
    show_progress: bool,
) -> dict[str, Any]:
    """One (method, seed) run; module-level so that worker processes can run it."""
    from gradand.experiments.spirals import combiner_from
    from gradand.experiments.training import MLPSpec, Penalty, train_classifier

    spec = train.methods()[method]
    data = dataclasses.replace(setting, **spec["data"]).make(seed)
    features = data.train_x.shape[-1]
    penalty = None
    if spec["penalty"] is not None:
        penalty = Penalty(*spec["penalty"], anneal_steps=train.anneal_steps(setting.n_train))
    out = train_classifier(
        MLPSpec(
            in_features=features,
            out_features=1,
            hidden_units=train.hidden_units,
            hidden_layers=train.hidden_layers,
        ),
        backend=backend,
        train_x=data.train_x,
        train_y=data.train_y,
        eval_sets={
            "train": (data.train_x.reshape(-1, features), data.train_y.reshape(-1)),
            "test": (data.test_x, data.test_y),
        },
        combiner=combiner_from(spec["combiner"]),
        penalty=penalty,
        loss="bce",
        epochs=train.epochs,
        batch_size=min(train.batch_size, setting.n_train),
        lr=train.lr,
        weight_decay=train.weight_decay,
        eval_every=train.eval_every,
        seed=seed,
        device=device,
        show_progress=show_progress,
        desc=f"colored-digits {method} seed {seed}",
    )
    del out["model"]  # results cross process boundaries; a framework's model need not pickle
    return out


def _difference(per_method: dict[str, dict[str, Any]], a: str, b: str) -> Any:
    """The per-seed difference of test accuracies ``a − b`` (paired by seed) as a distribution."""
    from gradand.experiments._distribution import distribution

    return distribution(np.subtract(per_method[a]["test_acc"], per_method[b]["test_acc"]), threshold=0.0)


def _interval(d: Any) -> str:
    if d.low is None:
        return f"{d.mean:+.3f} (1 seed: no interval)"
    return f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"


def _checks(per_method: dict[str, dict[str, Any]], train: TrainSetting) -> list[Any]:
    """The claims, decided on paired per-seed differences of test accuracy and their 95 % intervals.

    "Better" means the interval of the mean difference lies above 0; "no better" that its
    lower end is at most 0. With one seed there is no interval and the mean decides.
    """
    from gradand.experiments._report import Check

    checks = []

    def low(d: Any) -> float:
        return d.mean if d.low is None else d.low

    if "mean" in per_method:
        test = per_method["mean"]["test"]
        high = test["mean"] if test["high"] is None else test["high"]
        checks.append(
            Check(
                f"averaging learns the colour: test accuracy below chance (test {test['mean']:.3f}, "
                f"interval's upper end {high:.3f} < {SUCCESS})",
                high < SUCCESS,
                {"mean_test": test},
            )
        )
    for m, what in (
        ("and_mask", f"AND-mask (τ={train.threshold:g})"),
        ("and_mask_low", f"AND-mask (τ={train.low_threshold:g})"),
        ("geometric_mean", f"geometric mean (τ={train.threshold:g})"),
    ):
        if m in per_method and "mean" in per_method:
            d = _difference(per_method, m, "mean")
            checks.append(
                Check(
                    f"{what} no better than averaging on test when every environment's colour gradient "
                    f"has the same sign: test difference {_interval(d)}",
                    low(d) <= 0.0,
                    {"difference": d.to_json()},
                )
            )
    if "reversed_and_mask" in per_method and "reversed_mean" in per_method:
        d = _difference(per_method, "reversed_and_mask", "reversed_mean")
        checks.append(
            Check(
                f"with {train.reversed_envs} training environment(s) reversed, the AND-mask "
                f"(τ={train.threshold:g}) improves over averaging on test: difference {_interval(d)}",
                low(d) > 0.0,
                {"difference": d.to_json()},
            )
        )
    for m, what in (("irm", "IRMv1"), ("vrex", "V-REx"), ("grayscale", "averaging on grayscale inputs")):
        if m in per_method and "mean" in per_method:
            d = _difference(per_method, m, "mean")
            checks.append(
                Check(
                    f"{what} beats averaging on test: difference {_interval(d)}",
                    low(d) > 0.0,
                    {"difference": d.to_json()},
                )
            )
    return checks


def run(
    setting: ColoredDigitsSetting,
    train: TrainSetting,
    *,
    methods: tuple[str, ...] = METHODS,
    seeds: tuple[int, ...] = tuple(range(10)),
    backend: str = "torch",
    device: str = "cpu",
    show_progress: bool = True,
    preset_name: str = "custom",
    log: Any = None,
    jobs: int | None = 1,
    threads: int | None = None,
) -> Any:
    """Train every method on every seed of colored digits and check the claims on the distributions.

    Returns a :class:`gradand.experiments._report.Report`. Seed ``s`` makes the data
    (:meth:`ColoredDigitsSetting.make`, the controls changed as each method says),
    initialises the model and shuffles the batches; every method sees the same images,
    noise and initialisation for a seed, so differences between methods are paired by
    seed. Per method: train and test accuracy as distributions over seeds
    (:func:`gradand.experiments._distribution.distribution`: mean with a 95 % Student-t
    interval; success = test accuracy ≥ 0.5). ``jobs``, ``threads``, ``log`` and the
    progress bars work as in :func:`gradand.experiments.spirals.run`.

    Example:
        >>> from gradand.experiments.colored_digits import ColoredDigitsSetting, TrainSetting, run
        >>> report = run(ColoredDigitsSetting(n_envs=2, n_train=64), TrainSetting(hidden_units=4, epochs=2),
        ...              methods=("mean", "irm"), seeds=(0,), show_progress=False)
        >>> sorted(report.results["methods"]), report.results["methods"]["irm"]["test"]["n"]
        (['irm', 'mean'], 1)
    """
    from gradand.experiments import TRAINING_MODULES
    from gradand.experiments._distribution import distribution
    from gradand.experiments._parallel import run_many
    from gradand.experiments._report import Report, format_table

    if backend not in TRAINING_MODULES:
        raise ValueError(f"backend must be one of {sorted(TRAINING_MODULES)}; got {backend!r}")
    table_methods = train.methods()
    unknown = [m for m in methods if m not in table_methods]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {list(table_methods)}; got {list(methods)}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    runs = [(seed, m) for seed in seeds for m in methods]

    def line(run: tuple[int, str], out: dict[str, Any]) -> str:
        return (
            f"colored-digits {run[1]} seed {run[0]}: train {out['final']['train']:.3f} "
            f"test {out['final']['test']:.3f} ({out['seconds']:.1f} s)"
        )

    by_run, workers, threads = run_many(
        _run_one,
        runs,
        lambda run, inner: (backend, setting, train, run[1], run[0], device, inner),
        jobs=jobs, threads=threads, device=device, backend=backend, desc="colored-digits runs",
        show_progress=show_progress, inner_progress=True, log=log, line=line,
        # longest runs first (the per-environment combiners), so that workers finish together
        first=lambda run: table_methods[run[1]]["combiner"][0] == "mean",
    )  # fmt: skip
    per_method: dict[str, dict[str, Any]] = {}
    rows = []
    for m in methods:
        done_runs = [by_run[(seed, m)] for seed in seeds]
        r: dict[str, Any] = {
            "label": _label(table_methods[m]),
            "train_acc": [o["final"]["train"] for o in done_runs],
            "test_acc": [o["final"]["test"] for o in done_runs],
            "survivor_fraction": [o["survivor_fraction"] for o in done_runs],
            "curves": [o["curve"] for o in done_runs],
            "seconds": [o["seconds"] for o in done_runs],
        }
        train_d = distribution(r["train_acc"], threshold=SUCCESS)
        test_d = distribution(r["test_acc"], threshold=SUCCESS)
        r["train"], r["test"] = train_d.to_json(), test_d.to_json()
        per_method[m] = r
        spread = "" if test_d.half_width is None else f" ± {test_d.half_width:.3f}"
        train_spread = "" if train_d.half_width is None else f" ± {train_d.half_width:.3f}"
        rows.append(
            [
                m,
                r["label"],
                f"{train_d.mean:.3f}{train_spread}",
                f"{test_d.mean:.3f}{spread}",
                f"{test_d.successes}/{test_d.n}",
                f"{float(np.mean(r['survivor_fraction'])):.3f}",
            ]
        )
    table = format_table(
        ["method", "setting", "train acc", "test acc ± 95%", f"test ≥ {SUCCESS}", "grad kept"], rows
    )
    checks = _checks(per_method, train)

    def draw(plt: Any) -> Any:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
        names = list(per_method)
        xs = np.arange(len(names))
        for off, key, color in ((-0.2, "train", "tab:blue"), (0.2, "test", "tab:orange")):
            d = [per_method[m][key] for m in names]
            means = [v["mean"] for v in d]
            errors = [0.0 if v["low"] is None else (v["high"] - v["low"]) / 2 for v in d]
            ax1.bar(xs + off, means, 0.4, yerr=errors, label=f"{key} (mean, 95% CI)", color=color, capsize=3)
            for x, v in zip(xs, d):
                ax1.plot(np.full(len(v["values"]), x + off), v["values"], ".", color="k", ms=3)
        ax1.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax1.axhline(0.75, color="gray", lw=0.8, ls=":")
        ax1.set_xticks(xs, names, rotation=30, ha="right")
        ax1.set_ylim(0, 1.0)
        ax1.set_ylabel("accuracy (dots: seeds)")
        ax1.set_title(f"colored digits ({preset_name}), {len(seeds)} seed(s); dotted: shape alone (0.75)")
        ax1.legend(loc="upper right", fontsize=8)
        for m in names:
            curves = per_method[m]["curves"]
            ax2.plot(curves[0]["epoch"], np.mean([c["test"] for c in curves], axis=0), label=m)
        ax2.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("test accuracy (mean over seeds)")
        ax2.set_ylim(0, 1.0)
        ax2.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        return fig

    notes = [
        "differences are paired by seed (same images, noise and initialisation); 'better' means the 95% "
        "interval of the mean difference lies above 0"
    ]
    if len(seeds) < 2:
        notes.append("one seed: no intervals; the claims are decided on that seed's numbers alone")
    if preset_name != "default":
        notes.append(f"the documented numbers are for the default preset; this run used {preset_name!r}")
    config = {
        "preset": preset_name,
        "data": dataclasses.asdict(setting),
        "train": dataclasses.asdict(train),
        "anneal_steps": train.anneal_steps(setting.n_train),
        "methods": {m: table_methods[m] for m in methods},
        "seeds": list(seeds),
        "backend": backend,
        "device": device,
        "workers": workers,
        "threads_per_worker": threads,
    }
    return Report("colored-digits", config, {"methods": per_method}, checks, table, draw, notes)
