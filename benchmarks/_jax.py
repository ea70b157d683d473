"""JAX strategies: plain averaging, ``gradand.backends.jax.value_and_grad`` and, for the MLP
workloads, ``value_and_grad(method="factored")`` (jitted, optax Adam)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from _common import COMBINER, Workload, data

from gradand.backends import jax as gj

PLAIN = "plain averaging"


def configure(threads: int) -> None:  # threads are pinned with XLA_FLAGS before jax is imported (run.py)
    pass


def versions() -> dict[str, str]:
    return {"jax": jax.__version__, "optax": optax.__version__, "jax_backend": jax.default_backend()}


def init(w: Workload) -> dict:
    key = jax.random.key(0)
    params = {}
    if w.model == "mlp":
        sizes = [w.inputs] + [w.hidden] * w.layers + [1]
    else:
        for i, (cin, cout) in enumerate(((3, 16), (16, 32))):
            key, k = jax.random.split(key)
            params[f"conv{i}"] = (
                jax.random.normal(k, (3, 3, cin, cout)) * (2.0 / (9 * cin)) ** 0.5,
                jnp.zeros(cout),
            )
        sizes = [32 * (w.image // 4) ** 2, w.classes]
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        key, k = jax.random.split(key)
        params[f"dense{i}"] = (jax.random.normal(k, (a, b)) * (2.0 / a) ** 0.5, jnp.zeros(b))
    return params


def loss_for(w: Workload, matmul: Callable | None = None) -> Callable:
    """One environment's loss; ``matmul(x, kernel, bias)`` for the MLP's layers (``gj.dense``: factored)."""
    dense = sorted(k for k in init_keys(w) if k.startswith("dense"))
    affine = matmul or (lambda x, wt, b: x @ wt + b)

    def mlp_loss(params, batch):
        x, y = batch
        h = x
        for i, name in enumerate(dense):
            wt, b = params[name]
            h = affine(h, wt, b)
            if i < len(dense) - 1:
                h = jax.nn.relu(h)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(h, y))

    def cnn_loss(params, batch):
        x, y = batch  # x: (n, H, W, 3)
        h = x
        for name in ("conv0", "conv1"):
            k, b = params[name]
            h = jax.lax.conv_general_dilated(h, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h + b)
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        wt, b = params["dense0"]
        logits = h.reshape(h.shape[0], -1) @ wt + b
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return mlp_loss if w.model == "mlp" else cnn_loss


def init_keys(w: Workload) -> list[str]:
    n_dense = w.layers + 1 if w.model == "mlp" else 1
    return [f"dense{i}" for i in range(n_dense)] + ([] if w.model == "mlp" else ["conv0", "conv1"])


def _batch(w: Workload, device: str) -> tuple:
    xs, ys = data(w)
    if w.model == "cnn":
        xs = xs.transpose(0, 1, 3, 4, 2)  # NHWC
    dev = jax.devices("gpu" if device.startswith("cuda") else "cpu")[0]
    return jax.device_put(jnp.asarray(xs), dev), jax.device_put(jnp.asarray(ys), dev)


def compiled_steps(w: Workload, device: str) -> dict[str, tuple[Callable, tuple]]:
    """Each strategy as ``(jitted step, initial carry)``; the step maps ``(params, state, batch)``."""
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
    if w.model == "mlp":  # dense layers only: the factored path (gj.dense in place of x @ w + b)
        grad_fn = gj.value_and_grad(loss_for(w, gj.dense), COMBINER, method="factored")

        def factored(params, state, batch):
            (value, _), grads = grad_fn(params, batch)
            updates, state = adam.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

        fns["gradand factored"] = factored
    params = jax.device_put(init(w), batch[0].devices().pop())
    return {name: (jax.jit(fn), (params, adam.init(params)), batch) for name, fn in fns.items()}


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
