"""The layers the factored source records, and the gradient op of each layer's variables.

A supported layer's ``call`` is replaced, for one forward pass, by the same
computation that also records the layer's input ``x`` and pre-activation
output ``z`` (a :class:`Call`); ``Δ = ∂loss/∂z`` comes from one
``tape.gradient``. Per environment:

- ``keras.layers.Dense``: kernel ``X_eᵀ Δ_e``, bias ``Σ Δ_e`` (the core's products);
- ``keras.layers.Conv1D/Conv2D/Conv3D`` (channels_last): the kernel's gradient
  from TensorFlow's own weight-gradient op (``Conv2DBackpropFilter``,
  ``Conv3DBackpropFilterV2``: what ``tape.gradient`` runs for the layer) on
  each environment's raw inputs and output gradients, no im2col patches;
  bias ``Σ Δ_e`` over examples and positions.

``BatchNormalization`` is recorded by ``_batchnorm``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

__all__ = ["Call", "all_layers", "conv_gradient", "is_conv", "key", "recording_call", "supported"]

_CONVS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def key(v: Any) -> int:
    """Identity of a variable: a Keras variable and the ``tf.Variable`` it holds are one variable."""
    if isinstance(v, keras.Variable):
        v = v.value
    return id(v)


def all_layers(model: Any) -> list[Any]:
    """``model`` and every layer nested in it."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is None:  # pragma: no cover - Keras internals moved
        return list(getattr(model, "layers", []))
    return list(flatten(include_self=True, recursive=True))


def _plain(layer: Any) -> bool:
    """No LoRA, not quantized, no ``call`` patched onto the instance."""
    return (
        not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
        and "call" not in vars(layer)
    )


def is_conv(layer: Any) -> bool:
    return isinstance(layer, _CONVS)


def supported(layer: Any) -> bool:
    """A ``Dense`` or ``Conv1D/2D/3D`` layer computed by Keras' own ``call`` (channels_last convs)."""
    if isinstance(layer, keras.layers.Dense):
        return type(layer).call is keras.layers.Dense.call and _plain(layer)
    return (
        any(isinstance(layer, c) and type(layer).call is c.call for c in _CONVS)
        and type(layer).convolution_op is keras.layers.Conv2D.convolution_op
        and layer.data_format == "channels_last"
        and layer.padding in ("valid", "same", "causal")
        and _plain(layer)
    )


class Call:
    """One call of a recorded layer: its input ``x`` and the tensor ``z`` whose gradient is ``Δ``.

    A ``BatchNormalization`` call records ``x̂`` as ``x`` and ``t = x̂ ⊙ γ`` as ``z``.
    """

    __slots__ = ("layer", "x", "z")

    def __init__(self, layer: Any, x: Any, z: Any) -> None:
        self.layer, self.x, self.z = layer, x, z


def recording_call(layer: Any, calls: list[Call], bad: set[int], batch: int) -> Callable[..., Any]:
    """The layer's ``call`` computed as Keras computes it, recording ``x`` and ``z`` before the activation."""
    conv = is_conv(layer)

    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        x = inputs
        if conv:
            padding = layer.padding
            if padding == "causal":  # Conv1D: left padding, then a valid convolution
                x = keras.ops.pad(x, layer._compute_causal_padding())
                padding = "valid"
            z = keras.ops.conv(
                x, layer.kernel, strides=list(layer.strides), padding=padding,
                dilation_rate=layer.dilation_rate, data_format=layer.data_format,
            )  # fmt: skip
            if layer.bias is not None:
                bias = keras.ops.reshape(layer.bias, (1,) * (layer.rank + 1) + (layer.filters,))
                z = keras.ops.add(z, bias)
            ok = x.shape.rank == layer.rank + 2
        else:
            z = keras.ops.matmul(x, layer.kernel)
            if layer.bias is not None:
                z = keras.ops.add(z, layer.bias)
            ok = x.shape.rank is not None and x.shape.rank >= 2
        if ok and x.shape[0] == batch:
            calls.append(Call(layer, x, z))
        else:
            bad.add(id(layer))
        return z if layer.activation is None else layer.activation(z)

    return call


#: Per-environment kernel gradients of a convolution, measured on the MNIST convnet's layers
#: (TensorFlow 2.21 CPU, 1 thread, medians of 7 in tf.function; Conv2D 1->32 and 32->64, 3x3 on
#: 28x28 and 26x26), milliseconds for the two layers:
#:   4 envs x 16:  one Conv2DBackpropFilter per environment 0.67 + 9.0; tf.vectorized_map of it (a
#:                 while_loop) 0.73 + 9.1; environments as groups of one grouped op 1.0 + 9.8; the same
#:                 under XLA 21 + 554; im2col (extract_patches + batched matmul) 4.3 + 25;
#:                 tape.gradient of a convolution per environment 0.94 + 8.7.
#:   128 envs x 1: per environment 6.7 + 25; vectorized_map 6.9 + 26; grouped 3.3 + 34;
#:                 XLA 1168 + 38031; im2col 8.5 + 50; tape 6.9 + 25.
#: One op per environment is fastest or tied everywhere but the grouped op on 1 input channel.
def conv_gradient(layer: Any) -> Callable[[Any, Any], Any]:
    """``gradient(x, d)``: inputs ``(e, n, *S, C)``, output gradients ``(e, n, *S', O)`` -> ``(e, *kernel)``.

    One weight-gradient op per environment (the op ``tape.gradient`` runs for the
    layer: ``Conv2DBackpropFilter``, a 1-D convolution as a 2-D one of height 1,
    ``Conv3DBackpropFilterV2``), linear in ``d``.
    """
    rank, groups = layer.rank, layer.groups
    shape = tuple(int(n) for n in layer.kernel.shape)  # (*k, C / groups, O)
    padding = "SAME" if layer.padding == "same" else "VALID"  # causal: inputs padded when recorded
    strides, dilations = (1, *layer.strides, 1), (1, *layer.dilation_rate, 1)

    def one(x: Any, d: Any) -> Any:
        if rank == 1:  # (n, W, C) as (n, 1, W, C)
            g = tf.compat.v1.nn.conv2d_backprop_filter(
                x[:, None], (1, *shape), d[:, None], (1, 1, *strides[1:]), padding,
                dilations=(1, 1, *dilations[1:]),
            )  # fmt: skip
            return g[0]
        if rank == 2:  # grouped 2-D convolutions included (the CPU kernel takes them)
            return tf.compat.v1.nn.conv2d_backprop_filter(x, shape, d, strides, padding, dilations=dilations)
        if groups == 1:
            return tf.raw_ops.Conv3DBackpropFilterV2(
                input=x, filter_sizes=shape, out_backprop=d, strides=strides, padding=padding,
                dilations=dilations,
            )  # fmt: skip
        # the CPU's 3-D kernel takes no groups: one op per group, concatenated over the outputs
        c, o = shape[-2], shape[-1] // groups
        parts = []
        for k in range(groups):
            parts.append(tf.raw_ops.Conv3DBackpropFilterV2(
                input=x[..., k * c : (k + 1) * c], filter_sizes=(*shape[:-1], o),
                out_backprop=d[..., k * o : (k + 1) * o], strides=strides, padding=padding,
                dilations=dilations,
            ))  # fmt: skip
        return tf.concat(parts, axis=-1)

    def gradient(x: Any, d: Any) -> Any:
        return tf.stack([one(x[i], d[i]) for i in range(x.shape[0])])

    return gradient
