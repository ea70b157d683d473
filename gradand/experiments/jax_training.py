"""The experiments' training loops in JAX + optax, on :mod:`gradand.backends.jax`.

The same models and optimisation as :mod:`gradand.experiments.torch_training`
(the reference code's MLP with Kaiming-normal weights, Adam with L2 weight
decay added to the gradient, a ×``lr_decay`` step, L1 as ``l1 · sign(θ)``),
written in plain JAX so that nothing beyond ``jax`` and ``optax`` is needed.
Per-environment gradients are combined by
:func:`gradand.backends.jax.value_and_grad` with ``method="factored"`` (the MLP's layers are
:func:`gradand.backends.jax.dense`, so every environment's or example's
kernel gradient statistics come from one backward pass); plain averaging (``Mean``) takes
``jax.grad`` of the mean loss over the whole step's batch, which equals the
mean of equally sized environments' gradients and lets batch norm use the
whole batch's statistics, as in the reference code.

Importing this module without JAX installed works (the doctest collector
imports every module); calling it raises a clear error.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

try:  # jax and optax are an optional extra
    import jax
    import jax.numpy as jnp
    import optax
except ImportError:  # pragma: no cover - exercised only without jax
    jax = jnp = optax = None

from gradand._combiners import Combiner, Mean
from gradand.experiments._report import progress
from gradand.experiments._schedule import schedule as epoch_schedule

__all__ = ["MLPSpec", "init_mlp", "resolve_device", "train_classifier", "train_patchwork"]

_BN_EPS = 1e-5
_BN_MOMENTUM = 0.1
_LEAKY_SLOPE = 0.01


def _need_jax() -> Any:
    if jax is None:
        raise ImportError("the JAX backend needs jax and optax: pip install 'gradand[jax]'")
    from gradand.backends import jax as gj

    return gj


def resolve_device(device: str) -> Any:
    """The JAX device for ``cpu``, ``cuda``/``gpu`` or ``cuda:N``, checked to exist.

    Example:
        >>> from gradand.experiments.jax_training import resolve_device
        >>> resolve_device("cpu").platform
        'cpu'
    """
    _need_jax()
    kind, _, index = device.partition(":")
    platform = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu"}.get(kind)
    if platform is None or (index and not index.isdigit()):
        raise ValueError(f"--device {device!r} is not a JAX device (expected cpu, cuda or cuda:N)")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: JAX sees no {platform.upper()} on this machine") from None
    i = int(index) if index else 0
    if i >= len(devices):
        raise ValueError(f"--device {device!r}: JAX sees only {len(devices)} {platform} device(s)")
    return devices[i]


class MLPSpec(dict):
    """The MLP's shape: ``in_features``, ``out_features``, ``hidden_units``, ``hidden_layers``,
    ``dropout``, ``batch_norm``, ``activation`` (``"leaky_relu"`` or ``"relu"``).

    Example:
        >>> from gradand.experiments.jax_training import MLPSpec
        >>> MLPSpec(in_features=3, out_features=1, hidden_units=4, hidden_layers=1)["dropout"]
        0.0
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        hidden_units: int,
        hidden_layers: int,
        dropout: float = 0.0,
        batch_norm: bool = False,
        activation: str = "leaky_relu",
    ) -> None:
        if activation not in ("leaky_relu", "relu"):
            raise ValueError(f"activation must be 'leaky_relu' or 'relu'; got {activation!r}")
        super().__init__(
            in_features=in_features,
            out_features=out_features,
            hidden_units=hidden_units,
            hidden_layers=hidden_layers,
            dropout=float(dropout),
            batch_norm=bool(batch_norm),
            activation=activation,
        )


def init_mlp(spec: MLPSpec, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parameters (Kaiming-normal weights, biases 0.01, batch-norm scale 1 / shift 0) and batch-norm state.

    Example:
        >>> from gradand.experiments.jax_training import MLPSpec, init_mlp
        >>> spec = MLPSpec(in_features=3, out_features=2, hidden_units=4, hidden_layers=1)
        >>> params, state = init_mlp(spec, 0)
        >>> sorted(params), params["w0"].shape, params["w1"].shape, state
        (['b0', 'b1', 'w0', 'w1'], (3, 4), (4, 2), {})
    """
    _need_jax()
    sizes = [spec["in_features"]] + [spec["hidden_units"]] * spec["hidden_layers"] + [spec["out_features"]]
    keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
    params: dict[str, Any] = {}
    state: dict[str, Any] = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        params[f"w{i}"] = jax.random.normal(keys[i], (fan_in, fan_out)) * math.sqrt(2.0 / fan_in)
        params[f"b{i}"] = jnp.full((fan_out,), 0.01)
        if spec["batch_norm"] and i < len(sizes) - 2:
            params[f"bn_scale{i}"] = jnp.ones(fan_out)
            params[f"bn_shift{i}"] = jnp.zeros(fan_out)
            state[f"bn_mean{i}"] = jnp.zeros(fan_out)
            state[f"bn_var{i}"] = jnp.ones(fan_out)
    return params, state


def apply_mlp(
    spec: MLPSpec, params: dict[str, Any], state: dict[str, Any], x: Any, *, train: bool, key: Any = None
) -> tuple[Any, dict[str, Any]]:
    """Forward pass: ``(logits, new_state)``; batch norm updates its running statistics in train mode.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradand.experiments.jax_training import MLPSpec, apply_mlp, init_mlp
        >>> spec = MLPSpec(in_features=3, out_features=1, hidden_units=4, hidden_layers=2, batch_norm=True)
        >>> params, state = init_mlp(spec, 0)
        >>> out, new_state = apply_mlp(spec, params, state, jnp.ones((5, 3)), train=True)
        >>> out.shape, sorted(new_state)[:2]
        ((5, 1), ['bn_mean0', 'bn_mean1'])
    """
    gj = _need_jax()
    n_layers = spec["hidden_layers"] + 1
    new_state = dict(state)
    h = x
    for i in range(n_layers):
        h = gj.dense(h, params[f"w{i}"], params[f"b{i}"])  # x @ w + b, visible to the factored path
        if i == n_layers - 1:
            break
        if spec["batch_norm"]:
            if train:
                mean, var = h.mean(0), h.var(0)
                n = h.shape[0]
                unbiased = var * n / max(n - 1, 1)
                new_state[f"bn_mean{i}"] = (1 - _BN_MOMENTUM) * state[f"bn_mean{i}"] + _BN_MOMENTUM * mean
                new_state[f"bn_var{i}"] = (1 - _BN_MOMENTUM) * state[f"bn_var{i}"] + _BN_MOMENTUM * unbiased
            else:
                mean, var = state[f"bn_mean{i}"], state[f"bn_var{i}"]
            h = (h - mean) / jnp.sqrt(var + _BN_EPS) * params[f"bn_scale{i}"] + params[f"bn_shift{i}"]
        h = jax.nn.leaky_relu(h, _LEAKY_SLOPE) if spec["activation"] == "leaky_relu" else jax.nn.relu(h)
        if train and spec["dropout"] > 0:
            key, sub = jax.random.split(key)
            keep = jax.random.bernoulli(sub, 1.0 - spec["dropout"], h.shape)
            h = jnp.where(keep, h / (1.0 - spec["dropout"]), 0.0)
    return h, new_state


def _loss(kind: str, logits: Any, y: Any) -> Any:
    if kind == "bce":
        return optax.sigmoid_binary_cross_entropy(logits[..., 0], y).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_classifier(
    spec: MLPSpec,
    *,
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_sets: dict[str, tuple[np.ndarray, np.ndarray]],
    combiner: Combiner,
    loss: str,
    epochs: int,
    batch_size: int,
    lr: float,
    envs_per_step: int | None = None,
    weight_decay: float = 0.0,
    l1: float = 0.0,
    lr_milestone: float | None = None,
    lr_decay: float = 0.1,
    eval_every: int = 1,
    seed: int = 0,
    device: str = "cpu",
    show_progress: bool = True,
    desc: str = "",
) -> dict[str, Any]:
    """JAX twin of :func:`gradand.experiments.torch_training.train_classifier` (same arguments and result).

    The model is given as an :class:`MLPSpec` and initialised from ``seed``;
    the result also holds the trained ``"params"`` and batch-norm ``"state"``.

    Example:
        >>> import numpy as np, gradand
        >>> from gradand.experiments.jax_training import MLPSpec, train_classifier
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((2, 16, 3)).astype(np.float32)
        >>> y = (x[..., 0] > 0).astype(np.float32)
        >>> spec = MLPSpec(in_features=3, out_features=1, hidden_units=8, hidden_layers=1)
        >>> evals = {"train": (x.reshape(-1, 3), y.reshape(-1))}
        >>> out = train_classifier(spec, train_x=x, train_y=y, eval_sets=evals, combiner=gradand.AndMask(0.5),
        ...     loss="bce", epochs=2, batch_size=8, lr=1e-2, show_progress=False)
        >>> sorted(out["final"]), out["steps"]
        (['train'], 4)
    """
    gj = _need_jax()
    dev = resolve_device(device)
    if loss not in ("bce", "ce"):
        raise ValueError(f"loss must be 'bce' or 'ce'; got {loss!r}")
    n_envs, n_per_env = train_x.shape[0], train_x.shape[1]
    _, group, groups_per_epoch, steps_per_epoch = epoch_schedule(n_envs, n_per_env, batch_size, envs_per_step)
    use_mean = isinstance(combiner, Mean)
    if not use_mean and (spec["batch_norm"] or spec["dropout"] > 0):
        raise ValueError(
            "per-environment combiners are run without batch norm and dropout in these experiments"
        )

    with jax.default_device(dev):
        params, state = init_mlp(spec, seed)
        milestones = (
            {} if lr_milestone is None else {max(1, int(lr_milestone * epochs)) * steps_per_epoch: lr_decay}
        )
        schedule = optax.piecewise_constant_schedule(lr, milestones)
        opt = optax.chain(
            optax.add_decayed_weights(weight_decay), optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8)
        )
        opt_state = opt.init(params)
        x_all = jnp.asarray(train_x)
        y_all = jnp.asarray(train_y if loss == "bce" else train_y.astype(np.int32))

        def mean_loss(p: Any, st: Any, xb: Any, yb: Any, key: Any) -> Any:
            flat_x = xb.reshape((-1, *xb.shape[2:]))
            out, new_st = apply_mlp(spec, p, st, flat_x, train=True, key=key)
            return _loss(loss, out, yb.reshape(-1)), new_st

        def env_loss(p: Any, batch: Any) -> Any:
            xe, ye = batch
            out, _ = apply_mlp(spec, p, state, xe, train=True)
            return _loss(loss, out, ye)

        combined = (
            None
            if use_mean
            else gj.value_and_grad(env_loss, combiner, method="factored", nan_policy="propagate")
        )

        def finish(p: Any, grads: Any, o: Any) -> tuple[Any, Any]:
            if l1 > 0:
                grads = jax.tree.map(lambda g, w: g + l1 * jnp.sign(w), grads, p)
            updates, o = opt.update(grads, o, p)
            return optax.apply_updates(p, updates), o

        @jax.jit
        def step_mean(p: Any, st: Any, o: Any, xb: Any, yb: Any, key: Any) -> Any:
            (_, new_st), grads = jax.value_and_grad(mean_loss, has_aux=True)(p, st, xb, yb, key)
            p, o = finish(p, grads, o)
            return p, new_st, o, jnp.ones(())

        @jax.jit
        def step_combined(p: Any, st: Any, o: Any, xb: Any, yb: Any, key: Any) -> Any:
            (_, result), grads = combined(p, (xb, yb))
            p, o = finish(p, grads, o)
            return p, st, o, result.summary.survivor_fraction

        @jax.jit
        def predict(p: Any, st: Any, x: Any) -> Any:
            out, _ = apply_mlp(spec, p, st, x, train=False)
            return (out[..., 0] > 0).astype(jnp.float32) if loss == "bce" else jnp.argmax(out, -1)

        evals = {name: (jnp.asarray(ex), np.asarray(ey)) for name, (ex, ey) in eval_sets.items()}
        curve: dict[str, list[float]] = {"epoch": [], **{name: [] for name in evals}}
        survivors: list[Any] = []
        rng = np.random.default_rng(seed)
        key = jax.random.key(seed + 1)
        step_fn = step_mean if use_mean else step_combined
        start = time.perf_counter()
        total = epochs * steps_per_epoch
        bar = progress(range(total), total=total, desc=desc, enabled=show_progress)
        it = iter(bar)
        for epoch in range(epochs):
            perm = np.argsort(rng.random((n_envs, n_per_env)), axis=1)
            env_order = rng.permutation(n_envs) if group < n_envs else np.arange(n_envs)
            for s in range(steps_per_epoch):
                next(it, None)
                b, g = divmod(s, groups_per_epoch)
                envs = env_order[g * group : (g + 1) * group]
                idx = perm[envs, b * batch_size : (b + 1) * batch_size]
                xb, yb = x_all[envs[:, None], idx], y_all[envs[:, None], idx]
                key, sub = jax.random.split(key)
                params, state, opt_state, kept = step_fn(params, state, opt_state, xb, yb, sub)
                if not use_mean:
                    survivors.append(kept)
            if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
                curve["epoch"].append(epoch + 1)
                for name, (ex, ey) in evals.items():
                    pred = np.concatenate(
                        [
                            np.asarray(predict(params, state, ex[i : i + 4096]))
                            for i in range(0, len(ey), 4096)
                        ]
                    )
                    curve[name].append(float(np.mean(pred == ey)))
        if hasattr(bar, "close"):
            bar.close()
    return {
        "final": {name: curve[name][-1] for name in evals},
        "curve": curve,
        "survivor_fraction": float(np.mean([float(k) for k in survivors])) if survivors else 1.0,
        "steps": total,
        "seconds": time.perf_counter() - start,
        "params": params,
        "state": state,
    }


def train_patchwork(
    combiner: Combiner,
    *,
    environments: Sequence[int] = (0, 1, 2, 3),
    steps: int = 1000,
    lr: float = 0.3,
    lr_decay: float = 0.9995,
    weight_decay: float = 0.01,
    device: str = "cpu",
) -> Any:
    """The patchwork regression through :func:`gradand.backends.jax.value_and_grad` (float32).

    Example:
        >>> import gradand
        >>> from gradand.experiments.jax_training import train_patchwork
        >>> train_patchwork(gradand.AndMask(threshold=1.0, rescale=False)).weights.round(2).tolist()
        [0.0, 0.0, 0.0, 0.0, 3.0]
    """
    gj = _need_jax()
    from gradand.experiments.patchwork import PatchworkResult, inputs

    env = list(environments)
    if not env or any(not 0 <= e < 4 for e in env):
        raise ValueError(f"environments must be a non-empty subset of 0..3; got {environments!r}")
    xn, yn = inputs()
    with jax.default_device(resolve_device(device)):
        x, y = jnp.asarray(xn[env], dtype=jnp.float32), jnp.asarray(yn[env], dtype=jnp.float32)

        def loss(w: Any, batch: Any) -> Any:
            xe, ye = batch
            return 0.5 * (xe @ w - ye) ** 2

        grad = gj.value_and_grad(loss, combiner, nan_policy="propagate")

        @jax.jit
        def run(w: Any) -> Any:
            def body(carry: Any, _: Any) -> Any:
                w, rate = carry
                _, g = grad(w, (x, y))
                w = w - rate * (g + weight_decay * w)
                return (w, rate * lr_decay), w

            _, traj = jax.lax.scan(body, (w, jnp.float32(lr)), None, length=steps)
            return traj

        traj = np.concatenate(
            [np.zeros((1, 5)), np.asarray(run(jnp.zeros(5, jnp.float32)), dtype=np.float64)]
        )
    wn = traj[-1]
    per_env = 0.5 * (xn @ wn - yn) ** 2
    held = [e for e in range(4) if e not in env]
    return PatchworkResult(
        weights=wn,
        trajectory=traj,
        train_loss=float(per_env[env].mean()),
        heldout_loss=float(per_env[held].mean()) if held else math.nan,
    )
