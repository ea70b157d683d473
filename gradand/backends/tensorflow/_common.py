"""What the TensorFlow sources, sink and entry points share: argument checks, the loss call, replicas."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

METHODS: tuple[str, ...] = ("streaming", "vectorized")
FALLBACKS: tuple[str, ...] = ("vectorized", "error")


def check_tape(tape: Any) -> None:
    if not isinstance(tape, tf.GradientTape):
        raise TypeError(f"tape must be a tf.GradientTape; got {type(tape).__name__}")


def check_method(method: str, allowed: tuple[str, ...] = METHODS) -> str:
    """``method``, with the old name ``"loop"`` accepted (with a warning) for ``"streaming"``."""
    if method == "loop" and "streaming" in allowed:
        warnings.warn("method='loop' is now method='streaming'", DeprecationWarning, stacklevel=3)
        return "streaming"
    if method not in allowed:
        raise ValueError(f"method must be one of {allowed}; got {method!r}")
    return method


def check_fallback(fallback: str) -> str:
    """``fallback``, with the old value ``"jacobian"`` accepted (with a warning) for ``"vectorized"``."""
    if fallback == "jacobian":
        warnings.warn("fallback='jacobian' is now fallback='vectorized'", DeprecationWarning, stacklevel=3)
        return "vectorized"
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}; got {fallback!r}")
    return fallback


def check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1; got {chunk_size!r}")


def flat_variables(variables: Any) -> list[Any]:
    flat = tf.nest.flatten(variables)
    if not flat:
        raise ValueError(
            "variables is empty; pass the variables to differentiate (e.g. model.trainable_variables)"
        )
    for k, v in enumerate(flat):
        if not isinstance(v, (tf.Variable, tf.Tensor)) and not hasattr(v, "value"):
            raise TypeError(f"variables[{k}] must be a tf.Variable or tensor; got {type(v).__name__}")
    return flat


def check_loss(loss: Any, where: str) -> Any:
    loss = tf.convert_to_tensor(loss) if not isinstance(loss, (tf.Tensor, tf.Variable)) else loss
    if loss.shape.rank != 0:
        raise ValueError(
            f"{where} must be a scalar (one loss per environment); got shape {tuple(loss.shape)}. "
            f"Reduce each environment's per-example losses to their mean first"
        )
    if not loss.dtype.is_floating:
        raise TypeError(f"{where} must have a floating dtype; got {loss.dtype.name}")
    return loss


#: Op types that write a resource variable (assignments, optimizer applies, scatters). Under
#: ``tf.vectorized_map`` the environments do not write one after another: each reads the same old
#: value and one write is kept.
_WRITE_PREFIXES = ("Assign", "ResourceApply", "ResourceSparseApply", "ResourceScatter",
                   "ResourceStridedSliceAssign")  # fmt: skip


def _writes(ops: Any, graph: Any, seen: set[str]) -> list[str]:
    """Names of the ops among ``ops`` (and the functions they call) that write a variable."""
    found = []
    for op in ops:
        if op.type.startswith(_WRITE_PREFIXES):
            found.append(op.name)
        for attr in ("f", "then_branch", "else_branch", "body", "cond"):
            try:
                fn = op.get_attr(attr)
            except (ValueError, TypeError):
                continue
            name = getattr(fn, "name", None)
            if not name or name in seen:
                continue
            seen.add(name)
            inner = graph._get_function(name) if hasattr(graph, "_get_function") else None
            body = getattr(getattr(inner, "graph", None), "get_operations", None)
            if body is not None:
                found += [f"{op.name}/{n}" for n in _writes(body(), inner.graph, seen)]
            elif inner is not None and hasattr(inner, "definition"):
                nodes = inner.definition.node_def
                found += [f"{op.name}/{n.name}" for n in nodes if n.op.startswith(_WRITE_PREFIXES)]
    return found


def refuse_writes(graph: Any, first: int, where: str) -> None:
    """Raise if the ops added to ``graph`` since its ``first``-th op write a variable.

    For loss functions mapped over the environments by ``tf.vectorized_map``, where a
    write (a ``BatchNormalization``'s moving statistics in training mode, a counter)
    would be applied once, not once per environment.
    """
    written = _writes(graph.get_operations()[first:], graph, set())
    if written:
        shown = ", ".join(written[:3]) + (f" and {len(written) - 3} more" if len(written) > 3 else "")
        raise ValueError(
            f"{where} writes variables ({shown}), e.g. a BatchNormalization's moving statistics in "
            f"training mode; under tf.vectorized_map the environments' writes are not applied one "
            f"after another (one of them is kept). Use streaming_statistics (one pass per "
            f"environment) or factored_statistics (BatchNormalization per environment), or call "
            f"the model with training=False"
        )


def is_keras_loss(loss_fn: Any) -> bool:
    """A ``keras.losses.Loss`` object or a function of ``keras.losses``: called ``(targets, outputs)``."""
    if isinstance(loss_fn, keras.losses.Loss):
        return True
    module = getattr(loss_fn, "__module__", None) or ""
    return inspect.isfunction(loss_fn) and module.startswith("keras") and ".losses" in module


def call_loss(loss_fn: Callable[..., Any], outputs: Any, targets: Any) -> Any:
    """One environment's scalar loss: ``loss_fn(outputs, targets)``, or the Keras way for Keras losses."""
    if is_keras_loss(loss_fn):
        loss = loss_fn(targets, outputs)
        if not isinstance(loss_fn, keras.losses.Loss):  # a keras.losses function: per-example losses
            loss = tf.reduce_mean(loss)
    else:
        loss = loss_fn(outputs, targets)
    loss = tf.convert_to_tensor(loss)
    if loss.shape.rank != 0:
        raise ValueError(
            f"loss_fn must return one environment's loss as a scalar; got shape {tuple(loss.shape)}. "
            f"Reduce the per-example losses to their mean (a keras.losses.Loss object does)"
        )
    if not loss.dtype.is_floating:
        raise TypeError(f"loss_fn must return a floating loss; got {loss.dtype.name}")
    return loss


def replicas() -> tuple[tf.distribute.ReplicaContext | None, int]:
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        return None, 1
    return ctx, ctx.num_replicas_in_sync


def unscale_factor(loss_scale: Any) -> Any:
    """``1 / loss_scale``: a Python float, or a 0-d tensor for a ``LossScaleOptimizer``'s dynamic scale.

    ``None`` follows TensorFlow's convention for replicas: the losses carry ``1 / num_replicas``.
    """
    if loss_scale is None:
        return float(replicas()[1])
    if isinstance(loss_scale, keras.optimizers.LossScaleOptimizer):
        # what scale_loss multiplies by: the dynamic scale once built, the initial one before
        scale = loss_scale.dynamic_scale if loss_scale.built else loss_scale.initial_scale
        scale = tf.convert_to_tensor(scale)
        return 1.0 / tf.cast(scale, tf.float32)
    if (
        isinstance(loss_scale, bool)
        or not isinstance(loss_scale, (int, float))
        or not 0 < loss_scale < math.inf
    ):
        raise ValueError(
            f"loss_scale must be a finite number > 0, a keras.optimizers.LossScaleOptimizer or None; "
            f"got {loss_scale!r}"
        )
    return 1.0 / float(loss_scale)


def scaled(g: Any, factor: Any) -> Any:
    if isinstance(factor, float) and factor == 1.0:
        return g
    return g * tf.cast(factor, g.dtype)


def dense(grad: Any) -> Any:
    return tf.convert_to_tensor(grad) if isinstance(grad, tf.IndexedSlices) else grad
