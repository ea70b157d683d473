"""JAX strategies: plain averaging, ``gradand.backends.jax.value_and_grad`` and, but for the
cnn workload, ``value_and_grad(method="factored")`` (jitted, optax Adam); models are pure
functions of a params pytree."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from _common import COMBINER, Workload, accepted, data

from gradand.backends import jax as gj

PLAIN = "plain averaging"


def configure(threads: int) -> None:  # threads are pinned with XLA_FLAGS before jax is imported (run.py)
    pass


def versions() -> dict[str, str]:
    return {"jax": jax.__version__, "optax": optax.__version__, "jax_backend": jax.default_backend()}


def _he(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    return jax.random.normal(key, shape) * (2.0 / fan_in) ** 0.5


def init(w: Workload) -> dict:
    """The params pytree: ``name -> (kernel, bias)`` (resnet: BatchNorm ``(scale, offset)`` too, nested)."""
    key = jax.random.key(0)
    if w.model == "resnet":
        return _init_resnet(w, key)
    params = {}
    if w.model == "mlp":
        sizes = [w.inputs] + [w.hidden] * w.layers + [1]
    else:
        convs = ((w.channels, 16), (16, 32)) if w.model == "cnn" else ((w.channels, 32), (32, 64))
        for i, (cin, cout) in enumerate(convs):
            key, k = jax.random.split(key)
            params[f"conv{i}"] = (_he(k, (3, 3, cin, cout), 9 * cin), jnp.zeros(cout))
        if w.model == "cnn":
            sizes = [32 * (w.image // 4) ** 2, w.classes]
        else:  # convnet
            sizes = [64 * ((w.image - 4) // 2) ** 2, w.hidden, w.classes]
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        key, k = jax.random.split(key)
        params[f"dense{i}"] = (_he(k, (a, b), a), jnp.zeros(b))
    return params


def _init_resnet(w: Workload, key: jax.Array) -> dict:
    keys = iter(jax.random.split(key, 64))

    def conv(cin: int, cout: int, size: int = 3) -> jax.Array:  # no bias: BatchNorm follows
        return _he(next(keys), (size, size, cin, cout), size * size * cin)

    def bn(c: int) -> tuple[jax.Array, jax.Array]:
        return jnp.ones(c), jnp.zeros(c)

    blocks, cin = [], w.width
    for stage in range(4):
        cout = w.width * 2**stage
        for i in range(2):
            block = {"conv1": conv(cin, cout), "bn1": bn(cout), "conv2": conv(cout, cout), "bn2": bn(cout)}
            if _stride(stage, i) != 1 or cin != cout:
                block |= {"short_conv": conv(cin, cout, 1), "short_bn": bn(cout)}
            blocks.append(block)
            cin = cout
    fc = (_he(next(keys), (cin, w.classes), cin), jnp.zeros(w.classes))
    return {"stem": {"conv": conv(w.channels, w.width), "bn": bn(w.width)}, "blocks": blocks, "dense": fc}


def _stride(stage: int, block: int) -> int:
    return 2 if stage > 0 and block == 0 else 1


def _conv(h: jax.Array, kernel: jax.Array, stride: int = 1, padding: str | tuple = "SAME") -> jax.Array:
    return jax.lax.conv_general_dilated(
        h, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _max_pool(h: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _batch_norm(h: jax.Array, scale_offset: tuple[jax.Array, jax.Array], eps: float = 1e-5) -> jax.Array:
    """BatchNorm in train mode: statistics of the batch this loss sees (per environment under gradand).

    Computed inside the loss, so ``gj.value_and_grad`` (the loss mapped over environments) normalises
    each environment by its own examples' statistics, as torch's forward pass per environment does.
    The running statistics (used only in eval mode) are left out: no step here reads them.
    """
    scale, offset = scale_offset
    mean = jnp.mean(h, axis=(0, 1, 2))
    var = jnp.var(h, axis=(0, 1, 2))  # biased, as the normalisation in torch and Keras
    return (h - mean) * jax.lax.rsqrt(var + eps) * scale + offset


def loss_for(w: Workload, matmul: Callable | None = None, convolve: Callable | None = None) -> Callable:
    """One environment's loss; ``matmul(x, kernel, bias)`` for the dense layers and ``convolve(x,
    kernel, bias, strides=, padding=)`` for the convolutions (``gj.dense``, ``gj.conv``: factored)."""
    affine = matmul or (lambda x, wt, b: x @ wt + b)

    def conv(h, kernel, bias=None, stride=1, padding="SAME"):
        if convolve is not None:
            return convolve(h, kernel, bias, strides=stride, padding=padding)
        out = _conv(h, kernel, stride, padding)
        return out if bias is None else out + bias

    def mlp_loss(params, batch):
        x, y = batch
        h = x
        for i in range(w.layers + 1):
            wt, b = params[f"dense{i}"]
            h = affine(h, wt, b)
            if i < w.layers:
                h = jax.nn.relu(h)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(h, y))

    def cnn_loss(params, batch):
        x, y = batch  # x: (n, H, W, C)
        h = x
        for name in ("conv0", "conv1"):
            k, b = params[name]
            h = _max_pool(jax.nn.relu(conv(h, k, b)))
        wt, b = params["dense0"]
        logits = affine(h.reshape(h.shape[0], -1), wt, b)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def convnet_loss(params, batch):  # the PyTorch examples' MNIST net, without dropout
        x, y = batch  # x: (n, H, W, C)
        h = x
        for name in ("conv0", "conv1"):
            k, b = params[name]
            h = jax.nn.relu(conv(h, k, b, padding="VALID"))
        h = _max_pool(h).reshape(h.shape[0], -1)
        h = jax.nn.relu(affine(h, *params["dense0"]))
        logits = affine(h, *params["dense1"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def resnet_loss(params, batch):  # BatchNorm in train mode (batch statistics), see _batch_norm
        x, y = batch  # x: (n, H, W, C)
        pad = ((1, 1), (1, 1))  # torch's padding=1 (XLA's "SAME" pads stride-2 convs asymmetrically)
        stem = params["stem"]
        h = jax.nn.relu(_batch_norm(conv(x, stem["conv"], padding=pad), stem["bn"]))
        for i, block in enumerate(params["blocks"]):
            stride = _stride(i // 2, i % 2)
            out = jax.nn.relu(_batch_norm(conv(h, block["conv1"], None, stride, pad), block["bn1"]))
            out = _batch_norm(conv(out, block["conv2"], padding=pad), block["bn2"])
            if "short_conv" in block:
                h = _batch_norm(conv(h, block["short_conv"], None, stride, "VALID"), block["short_bn"])
            h = jax.nn.relu(out + h)
        logits = affine(jnp.mean(h, axis=(1, 2)), *params["dense"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    losses = {"mlp": mlp_loss, "cnn": cnn_loss, "convnet": convnet_loss, "resnet": resnet_loss}
    return losses[w.model]


def _batch(w: Workload, device: str) -> tuple:
    xs, ys = data(w)
    if w.model != "mlp":
        xs = xs.transpose(0, 1, 3, 4, 2)  # NHWC
    dev = jax.devices("gpu" if device.startswith("cuda") else "cpu")[0]
    return jax.device_put(jnp.asarray(xs), dev), jax.device_put(jnp.asarray(ys), dev)


@functools.cache
def compiled_steps(w: Workload, device: str) -> dict[str, tuple[Callable, tuple, tuple]]:
    """Each strategy as ``(jitted step, initial carry, batch)``; the step maps ``(params, state, batch)``.

    Cached: ``temp_memory`` reuses the jitted steps that ``strategies`` ran (no second trace and
    compile; the initial carry is never modified).
    """
    batch = _batch(w, device)
    loss = loss_for(w)
    adam = optax.adam(1e-3)
    E = w.envs
    chunk = max(1, E // 4)

    def plain(params, state, batch):
        x, y = batch
        flat = (x.reshape(-1, *x.shape[2:]), y.reshape(-1, *y.shape[2:]))
        value, grads = jax.value_and_grad(loss)(params, flat)
        updates, state = adam.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    def combined(chunk_size):
        grad_fn = gj.value_and_grad(loss, COMBINER, chunk_size=chunk_size)

        def step(params, state, batch):
            (value, _), grads = grad_fn(params, batch)
            updates, state = adam.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

        return step

    fns = {
        PLAIN: plain,
        "gradand value_and_grad": combined(None),
        f"gradand value_and_grad(chunk={chunk})": combined(chunk),
    }
    # the factored path: dense layers by gj.dense, convolutions by gj.conv; the rest (BatchNorm's
    # scale and offset) by vmap in the same pass
    grad_fn = gj.value_and_grad(loss_for(w, gj.dense, gj.conv), COMBINER, method="factored")

    def factored(params, state, batch):
        (value, _), grads = grad_fn(params, batch)
        updates, state = adam.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    fns["gradand factored"] = factored
    params = init(w)
    # the whole carry committed to the device, as the step's outputs are: an uncommitted leaf (Adam's
    # count) would make the second call compile the step again
    carry = jax.device_put((params, adam.init(params)), batch[0].devices().pop())
    steps = {name: (jax.jit(fn), carry, batch) for name, fn in fns.items()}
    # a strategy whose backend refuses the model raises ValueError while tracing: left out
    return accepted("jax", w, steps, lambda name, s: s[0].lower(*s[1], s[2]))


def strategies(w: Workload, device: str) -> dict[str, Callable[[], object]]:
    steps = {}
    for name, (fn, carry0, batch) in compiled_steps(w, device).items():
        steps[name] = _stateful(fn, carry0, batch)
    return steps


def _stateful(fn, carry0, batch) -> Callable[[], object]:
    carry = list(carry0)

    def step() -> object:
        params, state, value = fn(carry[0], carry[1], batch)
        carry[0], carry[1] = params, state
        return value

    return step


def sync(out: object) -> None:
    jax.block_until_ready(out)


def temp_memory(w: Workload, device: str) -> dict[str, float]:
    """XLA's own account of each compiled step's temporary buffers, in bytes (no subprocess needed)."""
    out = {}
    for name, (fn, (params, state), batch) in compiled_steps(w, device).items():
        analysis = fn.lower(params, state, batch).compile().memory_analysis()
        out[name] = float(analysis.temp_size_in_bytes) if analysis is not None else float("nan")
    return out
