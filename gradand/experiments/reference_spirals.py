"""The spirals data of the reference experiment, drawn as the authors' public code draws it.

The reference is ``and_mask/run_synthetic.py`` with the generator it imports
(``and_mask/datasets/synthetic/synthetic_data_gen.py``) in the paper's repository,
https://github.com/gibipara92/learning-explanations-hard-to-vary (read at commit
``55c49f5``). This module re-implements that construction in numpy, draw for draw,
so the arrays are the reference's arrays (float32, same values):

- **One legacy generator per environment.** Training environment ``e`` draws everything
  from ``np.random.RandomState(seed + e)``; the test set from
  ``np.random.RandomState(2**32 - 1)`` (:data:`REFERENCE_TEST_SEED`), whatever the seed.
- **Draw order** inside one generator: a ``(n_envs, shortcut_dims)`` standard-normal
  matrix of shortcut vectors; radii ``U(0.08, 1)``; labels ``randint(0, 2)``, i.i.d.
  Bernoulli(1/2) (not balanced); radial noise ``U(-0.02, 0.02)`` added after the angle
  ``2π · revolutions · radius + π · label`` is fixed; for the test set only, then, the
  per-example shortcut features ``N(0, 1)``.
- **Shortcuts.** Environment ``e`` uses row ``e`` of the matrix its *own* generator drew,
  times ``2·label - 1``: perfectly and linearly predictive inside ``e``. The test set draws
  the matrix too (and discards it), then gives every example its own random shortcut
  features, so they say nothing about the label.
- **Normalisation.** The two spiral features of each environment, and of the test set, are
  divided by *that set's own* standard deviation per feature (``std(axis=0)``, ``ddof=0``);
  nothing is centred, and the shortcut features are not rescaled (they are already unit
  normal).

How it differs from gradand's own generator (:func:`gradand.experiments.spirals.make_spirals`):

- **Labels**: here i.i.d. Bernoulli(1/2), so an environment of 1024 examples holds
  about 47–53 % ones (seed 0: 481 to 535); ``make_spirals`` balances every environment and
  the test set exactly.
- **Spiral scale**: here each environment, and the test set, is divided by its own
  standard deviation; ``make_spirals`` divides everything by the pooled training standard
  deviation.
- **Test set**: here one fixed set (seed ``2**32 - 1``) for every seed, which depends only
  on ``n_envs``, ``shortcut_dims``, ``n_test``, ``revolutions`` and ``shortcut_scale``;
  ``make_spirals`` draws a new test set from each seed.
- **Seeding**: here environment ``e`` of seed ``s`` is ``RandomState(s + e)``, so seed
  ``s + 1``'s environment ``e`` has exactly the spirals and labels of seed ``s``'s
  environment ``e + 1`` (only its shortcut vector differs), and seeds 0, 1, 2 share 14 of
  their 16 environments' samples; ``make_spirals`` spawns independent streams from one
  ``default_rng(seed)``, so different seeds share nothing.
- **Shortcut vectors**: here row ``e`` of a matrix that environment ``e``'s own generator
  draws; ``make_spirals`` draws one matrix for all environments. Both are unit normal.
- **Radial noise and radii** are the same (``U(-0.02, 0.02)``, ``U(0.08, 1)``); the
  reference's are fixed, ``make_spirals``' ``noise`` is a parameter.

In the reference the seed changes only the data: ``run_synthetic.py`` calls
``torch.manual_seed(0)`` and ``np.random.seed(0)`` once, before anything else, whatever
``--seed`` is, so the initialisation (Kaiming-normal weights, biases 0.01), the
``DataLoader`` shuffles (``shuffle=True, drop_last=True``, batch 256 per environment) and
the order in which environments are grouped all come from :data:`REFERENCE_INIT_SEED`.
Two more facts for a faithful loop: a prediction is ``logit >= 0``, and the test set is
evaluated at the *start* of each epoch, before its training, so the reference's last
logged test accuracy is that after ``epochs - 1`` epochs.

``shortcut_scale`` is this module's one extension: it multiplies every shortcut feature,
training and test (1, the default, is the reference; other values serve sweeps).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from gradand.experiments.spirals import SpiralsData

__all__ = [
    "REFERENCE_INIT_SEED",
    "REFERENCE_TEST_SEED",
    "ReferenceSpiralsSetting",
    "make_reference_spirals",
]

#: The reference's fixed seed of ``torch.manual_seed`` and ``np.random.seed``: the model's
#: initialisation, the data loaders' shuffles and the environments' grouping, whatever the
#: data seed.
REFERENCE_INIT_SEED: int = 0

#: The seed of the reference's one test set (the largest seed ``RandomState`` accepts).
REFERENCE_TEST_SEED: int = 2**32 - 1

_MAX_SEED = 2**32 - 1
_RADIUS_LOW, _RADIUS_HIGH, _RADIAL_NOISE = 0.08, 1.0, 0.02


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    bad = isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum
    if not bad and maximum is not None and value > maximum:
        bad = True
    if bad:
        expected = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {expected}; got {value!r}")
    return int(value)


def _check_positive(name: str, value: Any, *, allow_zero: bool) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {expected}; got {value!r}")
    return float(value)


def _draw_set(
    rng_seed: int, n: int, *, env: int | None, n_envs: int, shortcut_dims: int, revolutions: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One environment (``env``) or the test set (``env=None``), in the reference's draw order.

    Returns float64 inputs (n, 2 + d), labels (n,) and the shortcut vector used (d,)
    (zeros for the test set).
    """
    rng = np.random.RandomState(rng_seed)
    matrix = rng.randn(n_envs, shortcut_dims)
    radius = rng.uniform(_RADIUS_LOW, _RADIUS_HIGH, n)
    labels = rng.randint(0, 2, n)
    angle = 2.0 * revolutions * math.pi * radius + math.pi * labels
    radius = radius + rng.uniform(-_RADIAL_NOISE, _RADIAL_NOISE, n)
    spiral = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    spiral /= spiral.std(axis=0)
    if env is None:
        shortcut_vector = np.zeros(shortcut_dims)
        shortcut = rng.randn(n, shortcut_dims)
    else:
        shortcut_vector = matrix[env]
        shortcut = (2.0 * labels - 1.0)[:, None] * shortcut_vector[None, :]
    return np.hstack([spiral, shortcut]), labels.astype(np.float64), shortcut_vector


def make_reference_spirals(
    *,
    n_envs: int = 16,
    examples_per_env: int = 1024,
    n_test: int = 2000,
    shortcut_dims: int = 8,
    shortcut_scale: float = 1.0,
    revolutions: float = 3.0,
    seed: int = 0,
) -> SpiralsData:
    """The reference experiment's training environments and its fixed test set.

    The defaults are ``run_synthetic.py``'s (16 environments of 1024 examples, 2000
    test examples, 8 shortcut dimensions, 3 revolutions, seed 0). See the module
    docstring for the construction and how it differs from
    :func:`~gradand.experiments.spirals.make_spirals`.

    Args:
        n_envs: number of training environments (≥ 1).
        examples_per_env: examples per environment (≥ 2: each environment is scaled by
            its own standard deviation).
        n_test: test examples (≥ 2).
        shortcut_dims: shortcut dimensions d (≥ 0).
        shortcut_scale: factor on every shortcut feature (≥ 0; 1 is the reference).
        revolutions: turns of each spiral (> 0; the reference's is an integer, 3).
        seed: the data seed; environment ``e`` is drawn from ``RandomState(seed + e)``, so
            ``seed + n_envs - 1`` must be at most ``2**32 - 1``. It does not change the
            test set.

    Returns:
        :class:`~gradand.experiments.spirals.SpiralsData` (float32); ``shortcuts[e]`` is
        environment ``e``'s shortcut vector (times ``shortcut_scale``).

    Example:
        >>> import numpy as np
        >>> from gradand.experiments.reference_spirals import make_reference_spirals
        >>> a = make_reference_spirals(n_envs=4, examples_per_env=64, n_test=50, seed=0)
        >>> a.train_x.shape, a.train_y.shape, a.test_x.shape, a.shortcuts.shape
        ((4, 64, 10), (4, 64), (50, 10), (4, 8))
        >>> b = make_reference_spirals(n_envs=4, examples_per_env=64, n_test=50, seed=1)
        >>> bool(np.array_equal(a.test_x, b.test_x))  # one test set for every seed
        True
        >>> # seed 1's environment 0 has the spirals of seed 0's environment 1
        >>> bool(np.array_equal(a.train_x[1, :, :2], b.train_x[0, :, :2]))
        True
    """
    n_envs = _check_int("n_envs", n_envs, 1)
    examples_per_env = _check_int("examples_per_env", examples_per_env, 2)
    n_test = _check_int("n_test", n_test, 2)
    shortcut_dims = _check_int("shortcut_dims", shortcut_dims, 0)
    shortcut_scale = _check_positive("shortcut_scale", shortcut_scale, allow_zero=True)
    revolutions = _check_positive("revolutions", revolutions, allow_zero=False)
    try:
        seed = _check_int("seed", seed, 0, _MAX_SEED - (n_envs - 1))
    except ValueError as error:
        raise ValueError(
            f"{error} (environment e draws from RandomState(seed + e), which takes seeds up to 2**32 - 1)"
        ) from None

    common = {"n_envs": n_envs, "shortcut_dims": shortcut_dims, "revolutions": revolutions}
    envs = [_draw_set(seed + e, examples_per_env, env=e, **common) for e in range(n_envs)]
    test_x, test_y, _ = _draw_set(REFERENCE_TEST_SEED, n_test, env=None, **common)
    train_x = np.stack([x for x, _, _ in envs])
    train_y = np.stack([y for _, y, _ in envs])
    shortcuts = np.stack([s for _, _, s in envs]) * shortcut_scale
    if shortcut_scale != 1.0:
        train_x[:, :, 2:] *= shortcut_scale
        test_x[:, 2:] *= shortcut_scale

    f32 = np.float32
    return SpiralsData(
        train_x.astype(f32),
        train_y.astype(f32),
        test_x.astype(f32),
        test_y.astype(f32),
        shortcuts.reshape(n_envs, shortcut_dims).astype(f32),
    )


@dataclasses.dataclass(frozen=True)
class ReferenceSpiralsSetting:
    """Parameters of :func:`make_reference_spirals` (the data side of the ``reference`` preset).

    The training side that goes with it is the reference's fixed
    :data:`REFERENCE_INIT_SEED` for initialisation and shuffling. Invalid values fail
    here, on construction.

    Example:
        >>> from gradand.experiments.reference_spirals import ReferenceSpiralsSetting
        >>> ReferenceSpiralsSetting(n_envs=2, examples_per_env=4, n_test=4).make(0).train_x.shape
        (2, 4, 10)
        >>> ReferenceSpiralsSetting(n_envs=0)
        Traceback (most recent call last):
        ...
        ValueError: n_envs must be an integer >= 1; got 0
    """

    n_envs: int = 16
    examples_per_env: int = 1024
    n_test: int = 2000
    shortcut_dims: int = 8
    shortcut_scale: float = 1.0
    revolutions: float = 3.0

    def __post_init__(self) -> None:
        _check_int("n_envs", self.n_envs, 1)
        _check_int("examples_per_env", self.examples_per_env, 2)
        _check_int("n_test", self.n_test, 2)
        _check_int("shortcut_dims", self.shortcut_dims, 0)
        _check_positive("shortcut_scale", self.shortcut_scale, allow_zero=True)
        _check_positive("revolutions", self.revolutions, allow_zero=False)

    def make(self, seed: int) -> SpiralsData:
        """The data for one seed (the test set is the same for every seed).

        Example:
            >>> from gradand.experiments.reference_spirals import ReferenceSpiralsSetting
            >>> data = ReferenceSpiralsSetting(n_envs=3, examples_per_env=8, n_test=6).make(5)
            >>> data.train_y.shape, str(data.train_y.dtype)
            ((3, 8), 'float32')
        """
        return make_reference_spirals(**dataclasses.asdict(self), seed=seed)
