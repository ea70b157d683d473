"""The experiments' JAX + optax backend (a :class:`gradand.experiments.training.Backend`).

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
whole batch's statistics, as in the reference code. The training loop is
:func:`gradand.experiments.training.fit`.

Importing this module without JAX installed works (the doctest collector
imports every module); calling it raises a clear error.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

try:  # jax and optax are an optional extra
    import jax
    import jax.numpy as jnp
    import optax
except ImportError:  # pragma: no cover - exercised only without jax
    jax = jnp = optax = None

from gradand._combiners import Combiner, Mean
from gradand.experiments import training
from gradand.experiments.training import MLPSpec

__all__ = [
    "BACKEND",
    "MLP",
    "MLPSpec",
    "apply_mlp",
    "init_mlp",
    "resolve_device",
    "train_classifier",
    "train_patchwork",
]

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


class MLP(NamedTuple):
    """An MLP in JAX: its :class:`MLPSpec`, parameters and batch-norm state (what the backend builds).

    Example:
        >>> from gradand.experiments.jax_training import BACKEND, MLPSpec
        >>> spec = MLPSpec(in_features=3, out_features=1, hidden_units=4, hidden_layers=1)
        >>> model = BACKEND.build(spec, seed=0)
        >>> sorted(model.params), model.state
        (['b0', 'b1', 'w0', 'w1'], {})
    """

    spec: MLPSpec
    params: dict[str, Any]
    state: dict[str, Any]


def _example_losses(kind: str, logits: Any, y: Any) -> Any:
    """Per-example losses of logits (..., k) and labels (...)."""
    if kind == "bce":
        return optax.sigmoid_binary_cross_entropy(logits[..., 0], y)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


class _Trainer:
    """:class:`gradand.experiments.training.Trainer` of an :class:`MLP` (optax Adam, jitted steps)."""

    def __init__(self, model: MLP, options: training.TrainOptions) -> None:
        combiner, loss, weight_decay, l1, seed, device, penalty = options
        gj = _need_jax()
        spec = model.spec
        use_mean = isinstance(combiner, Mean)
        if not use_mean and (spec["batch_norm"] or spec["dropout"] > 0):
            raise ValueError(
                "per-environment combiners are run without batch norm and dropout in these experiments"
            )
        self._device = resolve_device(device)
        self._use_mean = use_mean
        self._params, self._state = jax.device_put((model.params, model.state), self._device)
        self._spec = spec
        opt = optax.inject_hyperparams(
            lambda learning_rate: optax.chain(
                optax.add_decayed_weights(weight_decay),
                optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8),
            )
        )(learning_rate=0.0)
        self._opt_state = jax.device_put(opt.init(self._params), self._device)
        self._key = jax.device_put(jax.random.key(seed + 1), self._device)

        def env_loss(p: Any, batch: Any) -> Any:
            xe, ye = batch
            out, _ = apply_mlp(spec, p, self._state, xe, train=True)
            return _example_losses(loss, out, ye).mean()

        combined = gj.value_and_grad(env_loss, combiner, method="factored", nan_policy="propagate")

        def gradients(p: Any, st: Any, x: Any, y: Any, key: Any, factors: Any) -> Any:
            """The objective, in one place: ``(grads, new batch-norm state, kept fraction)``.

            ``factors``: the penalty's (weight, scale) this step (``Penalty.factors``).
            """
            if use_mean:

                def mean_loss(p: Any) -> Any:
                    out, new_st = apply_mlp(spec, p, st, x.reshape((-1, *x.shape[2:])), train=True, key=key)
                    out = out.reshape((*x.shape[:2], *out.shape[1:]))

                    def env_losses(s: Any) -> Any:  # (E,) with the logits of environment e scaled by s[e]
                        scaled = out * s.reshape((-1,) + (1,) * (out.ndim - 1))
                        return _example_losses(loss, scaled, y).mean(1)

                    ones = jnp.ones(x.shape[0], out.dtype)
                    losses = env_losses(ones)
                    if penalty is None:
                        return losses.mean(), new_st
                    if penalty.kind == "irm":  # IRMv1: d L_e(s · logits) / ds at s = 1, per environment
                        term = jnp.mean(jax.grad(lambda s: env_losses(s).sum())(ones) ** 2)
                    else:  # V-REx: the variance of the environments' losses
                        term = jnp.mean((losses - losses.mean()) ** 2)
                    return (losses.mean() + factors[0] * term) * factors[1], new_st

                (_, new_st), grads = jax.value_and_grad(mean_loss, has_aux=True)(p)
                return grads, new_st, jnp.ones(())
            (_, result), grads = combined(p, (x, y))
            return grads, st, result.summary.survivor_fraction

        @jax.jit
        def step(p: Any, st: Any, o: Any, x: Any, y: Any, key: Any, factors: Any) -> Any:
            grads, st, kept = gradients(p, st, x, y, key, factors)
            if l1 > 0:
                grads = jax.tree.map(lambda g, w: g + l1 * jnp.sign(w), grads, p)
            updates, o = opt.update(grads, o, p)
            return optax.apply_updates(p, updates), st, o, kept

        @jax.jit
        def predict(p: Any, st: Any, x: Any) -> Any:
            out, _ = apply_mlp(spec, p, st, x, train=False)
            return (out[..., 0] > 0).astype(jnp.float32) if loss == "bce" else jnp.argmax(out, -1)

        self._step, self._predict = step, predict
        self._penalty, self._steps = penalty, 0

    @property
    def model(self) -> MLP:
        return MLP(self._spec, self._params, self._state)

    def put(self, array: np.ndarray) -> Any:
        return jax.device_put(np.asarray(array), self._device)

    def take(self, array: Any, index: np.ndarray) -> Any:
        return array[index]

    def set_learning_rate(self, rate: float) -> None:
        self._opt_state.hyperparams["learning_rate"] = jax.device_put(jnp.float32(rate), self._device)

    def step(self, x: Any, y: Any) -> Any:
        self._key, sub = jax.random.split(self._key)
        factors = np.float32(self._penalty.factors(self._steps) if self._penalty is not None else (0.0, 1.0))
        self._steps += 1
        self._params, self._state, self._opt_state, kept = self._step(
            self._params, self._state, self._opt_state, x, y, sub, factors
        )
        return None if self._use_mean else kept

    def predict(self, x: Any) -> np.ndarray:
        return np.asarray(self._predict(self._params, self._state, x))


class _Backend(training.Backend):
    """The JAX :class:`gradand.experiments.training.Backend` (``BACKEND``)."""

    trainer_type = _Trainer
    name = "jax"
    resolve_device = staticmethod(resolve_device)

    def build(self, spec: MLPSpec | training.CNNSpec, *, seed: int) -> MLP:
        _need_jax()
        if not isinstance(spec, MLPSpec):
            raise ValueError(
                "the JAX backend trains the MLP on flat inputs (digits); use --backend torch for CIFAR-10"
            )
        return MLP(spec, *init_mlp(spec, seed))

    def patchwork_gradient(
        self, combiner: Combiner, x: np.ndarray, y: np.ndarray, *, device: str = "cpu"
    ) -> Callable[[np.ndarray], np.ndarray]:
        gj = _need_jax()
        dev = resolve_device(device)
        xj, yj = jax.device_put((np.float32(x), np.float32(y)), dev)

        def loss(w: Any, batch: Any) -> Any:
            xe, ye = batch
            return 0.5 * (xe @ w - ye) ** 2

        grad = jax.jit(lambda w: gj.value_and_grad(loss, combiner, nan_policy="propagate")(w, (xj, yj))[1])
        return lambda w: np.asarray(grad(jax.device_put(np.float32(w), dev)), dtype=np.float64)

    def dense_layers(self, model: MLP) -> list[tuple[np.ndarray, np.ndarray]]:
        if not isinstance(model, MLP) or model.spec["batch_norm"]:
            raise ValueError("model must be the JAX backend's MLP without batch norm")
        p = model.params
        return [
            (np.asarray(p[f"w{i}"], dtype=np.float64), np.asarray(p[f"b{i}"], dtype=np.float64))
            for i in range(model.spec["hidden_layers"] + 1)
        ]


#: The JAX backend of the experiments (``training.get_backend("jax")``).
BACKEND = _Backend()


def train_classifier(spec: MLPSpec | MLP, **options: Any) -> dict[str, Any]:
    """:func:`gradand.experiments.training.train_classifier` with ``backend="jax"`` (same arguments).

    The model is given as an :class:`MLPSpec` (initialised from ``init_seed``,
    default ``seed``) or a built :class:`MLP`; the result also holds the
    trained ``"params"`` and batch-norm ``"state"``.

    Example:
        >>> import numpy as np, gradand
        >>> from gradand.experiments.jax_training import MLPSpec, train_classifier
        >>> x = np.ones((3, 4, 2), np.float32)
        >>> out = train_classifier(MLPSpec(in_features=2, out_features=5, hidden_units=4, hidden_layers=2),
        ...     train_x=x, train_y=np.zeros((3, 4), np.int64), eval_sets={}, combiner=gradand.AndMask(1.0),
        ...     loss="ce", epochs=1, batch_size=2, lr=1e-3, show_progress=False)
        >>> [out["params"][k].shape for k in ("w0", "w1", "w2")], out["state"]
        ([(2, 4), (4, 4), (4, 5)], {})
    """
    out = training.train_classifier(spec, backend=BACKEND, **options)
    return {**out, "params": out["model"].params, "state": out["model"].state}


def train_patchwork(combiner: Combiner, **options: Any) -> Any:
    """:func:`gradand.experiments.patchwork.train` with the combined gradient from JAX (float32).

    Example:
        >>> import gradand
        >>> from gradand.experiments.jax_training import train_patchwork
        >>> two = train_patchwork(gradand.GeometricMean(rescale=False), environments=(0, 1))
        >>> two.weights.round(2).tolist(), round(two.heldout_loss, 3)
        ([0.0, 0.0, 0.0, 0.0, 3.0], 0.005)
    """
    from gradand.experiments.patchwork import train

    return train(combiner, backend="jax", **options)
