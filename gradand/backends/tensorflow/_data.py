"""A ``tf.data`` pipeline of batches with a leading environment axis."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

__all__ = ["environment_batches"]


def environment_batches(
    environments: Sequence[Any],
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int | None = None,
) -> tf.data.Dataset:
    """Zip per-environment data into batches of shape ``(E, batch_size, ...)``.

    Each element of ``environments`` is one environment's data: a
    ``tf.data.Dataset`` of examples, or a tensor / array / tuple (or other
    ``tf.nest`` structure) of them with examples on axis 0 (e.g. ``(x_e, y_e)``).
    Every environment is shuffled (optionally) and batched separately with
    ``drop_remainder=True``, and the E batches are stacked on a new leading
    axis, so environment ``e``'s examples are ``batch[e]``. An epoch ends with
    the smallest environment. This is the input :class:`EnvironmentModel`
    expects with ``environment_axis=0``, and under ``tf.distribute`` the
    environments (not the examples) are split across replicas.

    Example:
        >>> import numpy as np
        >>> from gradand.backends.tensorflow import environment_batches
        >>> envs = [(np.zeros((6, 2)), np.zeros(6)), (np.ones((4, 2)), np.ones(4))]
        >>> x, y = next(iter(environment_batches(envs, batch_size=2)))
        >>> tuple(x.shape), tuple(y.shape)
        ((2, 2, 2), (2, 2))
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if isinstance(environments, (tf.data.Dataset, tf.Tensor)) or not isinstance(environments, Sequence):
        raise TypeError(
            f"environments must be a list with one entry per environment; got {type(environments).__name__}"
        )
    if not environments:
        raise ValueError("environments is empty; need at least one environment's data")
    batched = []
    for e, data in enumerate(environments):
        ds = data if isinstance(data, tf.data.Dataset) else tf.data.Dataset.from_tensor_slices(data)
        if shuffle:
            ds = ds.shuffle(
                _size_or(ds, 10_000), seed=None if seed is None else seed + e, reshuffle_each_iteration=True
            )
        batched.append(ds.batch(batch_size, drop_remainder=True))
    specs = [ds.element_spec for ds in batched]
    if any(not _same_structure(specs[0], s) for s in specs[1:]):
        raise ValueError(
            f"every environment must hold the same structure of tensors with the same shapes "
            f"apart from the number of examples; got element specs {specs}"
        )
    zipped = tf.data.Dataset.zip(tuple(batched))
    return zipped.map(
        lambda *per_env: tf.nest.map_structure(lambda *t: tf.stack(t), *per_env),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def _size_or(ds: tf.data.Dataset, default: int) -> int:
    n = int(ds.cardinality())
    return n if n > 0 else default


def _same_structure(a: Any, b: Any) -> bool:
    try:
        tf.nest.assert_same_structure(a, b)
    except (ValueError, TypeError):
        return False
    return all(
        x.dtype == y.dtype and x.shape.is_compatible_with(y.shape)
        for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b))
    )
