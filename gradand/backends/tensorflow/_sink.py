"""Sink: finalized updates for ``optimizer.apply_gradients``, one :class:`gradand.MaskInfo` each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

import gradand
from gradand import Combiner, Statistics
from gradand.backends.tensorflow import xp

__all__ = ["finalize_gradients"]


def finalize_gradients(
    stats: Sequence[Statistics | None], combiner: Combiner, *, structure: Any = None
) -> tuple[Any, Any]:
    """:func:`gradand.finalize` of each variable's statistics: ``(grads, infos)``.

    Args:
        stats: a flat list of statistics, in the order of the variables
            (``None`` for a variable no loss depends on stays ``None``).
        combiner: the combiner the statistics were computed for.
        structure: pack both lists like this ``tf.nest`` structure (e.g. the
            ``variables``); flat lists by default.

    Returns:
        ``(grads, infos)``: the updates and a :class:`gradand.MaskInfo` per
        variable, lists in the order of the variables.

    Example:
        >>> import tensorflow as tf
        >>> import gradand
        >>> import gradand.backends.tensorflow as gtf
        >>> c = gradand.AndMask(rescale=False)
        >>> s = gradand.statistics(tf.constant([[1.0, -1.0], [3.0, 1.0]]), c)
        >>> grads, infos = gtf.finalize_gradients([s], c)
        >>> grads[0].numpy(), float(infos[0].survivor_fraction)
        (array([2., 0.], dtype=float32), 0.5)
    """
    grads: list[Any] = []
    infos: list[Any] = []
    for s in stats:
        update, info = (None, None) if s is None else gradand.finalize(s, combiner, return_info=True, xp=xp)
        grads.append(update)
        infos.append(info)
    if structure is None:
        return grads, infos
    return tf.nest.pack_sequence_as(structure, grads), pack(structure, infos)


def pack(structure: Any, items: list[Any]) -> Any:
    """``items`` packed like ``structure`` without ``tf.nest`` descending into them (MaskInfo, None)."""
    boxes = [_Box(i) for i in items]
    return tf.nest.map_structure(lambda b: b.value, tf.nest.pack_sequence_as(structure, boxes))


class _Box:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value
