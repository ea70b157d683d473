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
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ColoredDigits",
    "ColoredDigitsSetting",
    "color_flip_probabilities",
    "make_colored_digits",
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
