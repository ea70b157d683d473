"""All-reduce: statistics merged over the replicas of a ``tf.distribute`` strategy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

import gradand
from gradand import Statistics

__all__ = ["all_reduce_statistics"]


def all_reduce_statistics(
    stats: Sequence[Statistics | None], *, replica_context: tf.distribute.ReplicaContext | None = None
) -> list[Statistics | None]:
    """Merge statistics over the replicas of a ``tf.distribute`` strategy (call inside ``strategy.run``).

    The core's :func:`gradand.all_reduce_statistics` does the rounds (the
    environment count, then the count-weighted means and the exact sign votes,
    then ``M2`` for ``SandMask``) with the replica context's SUM all-reduce;
    the result is the statistics of every replica's environments together,
    the same on every replica (``count`` becomes a 0-d int32 tensor inside a
    ``tf.function``). With one replica (no strategy) the statistics come back unchanged.

    Example:
        >>> import tensorflow as tf
        >>> import gradand
        >>> import gradand.backends.tensorflow as gtf
        >>> s = gradand.statistics(tf.constant([[1.0, -1.0]]), gradand.AndMask())
        >>> gtf.all_reduce_statistics([s])[0].count  # no strategy: one replica
        1
    """
    ctx = replica_context or tf.distribute.get_replica_context()
    if ctx is None:
        raise ValueError(
            "all_reduce_statistics() must run in a replica context (inside strategy.run(...)); "
            "it was called in a cross-replica context"
        )
    if ctx.num_replicas_in_sync == 1:
        return list(stats)
    present = [s for s in stats if s is not None]
    for s in present:
        if not isinstance(s, Statistics):
            raise TypeError(f"stats must hold gradand.Statistics or None; got {type(s).__name__}")
    if not present:
        return list(stats)

    def all_reduce_sum(arrays: Sequence[Any]) -> list[Any]:
        # TensorFlow keeps int32 tensors in host memory, and one all-reduce cannot mix host and
        # device tensors: the integer votes and counts travel as float32 (exact up to 2**24).
        sent = [tf.cast(a, tf.float32) if a.dtype == tf.int32 else a for a in arrays]
        summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, sent)
        return [tf.cast(r, tf.int32) if a.dtype == tf.int32 else r for a, r in zip(arrays, summed)]

    reduced = iter(gradand.all_reduce_statistics(present, all_reduce_sum))
    return [None if s is None else next(reduced) for s in stats]
