"""One training loop for the experiments, in every framework, behind two small protocols.

:func:`fit` is the experiments' training loop, written once: the epoch
schedule, a fresh numpy permutation of each environment's examples (and of
the environments) every epoch — so every backend sees the same batches for a
given seed —, the learning-rate step, the progress bar, evaluation every
``eval_every`` epochs and the result. It reaches the framework only through a
:class:`Trainer` (put arrays on the device, take a batch, set the learning
rate, take a step, predict). A :class:`Backend` builds the models of the
experiments (:class:`MLPSpec`, :class:`CNNSpec`) and a :class:`Trainer` for
one of them, in its framework's idiom and through gradand's fastest path
there; :func:`get_backend` finds one by name, importing its framework only
then. :func:`train_classifier` is the one call the experiments make.

The objective is one place per backend: the ``gradients`` function of its
trainer, which either combines the environments' gradients with a gradand
combiner or, for ``Mean()``, differentiates the mean of the per-environment
losses (a vector ``(E,)``, so a penalty on it, such as V-REx's variance or
IRMv1's, is one more term there, with its weight one more field of
:class:`TrainOptions`).
"""

from __future__ import annotations

import abc
import importlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from gradand._combiners import Combiner, Mean
from gradand.experiments import TRAINING_MODULES
from gradand.experiments._report import progress
from gradand.experiments._schedule import schedule as epoch_schedule

__all__ = [
    "LOSSES",
    "PENALTIES",
    "Backend",
    "CNNSpec",
    "MLPSpec",
    "Penalty",
    "TrainOptions",
    "Trainer",
    "check_loss",
    "fit",
    "get_backend",
    "learning_rate",
    "train_classifier",
]

#: The losses a trainer knows: binary cross-entropy on one logit, cross-entropy on class logits.
LOSSES: tuple[str, ...] = ("bce", "ce")

#: The invariance penalties a trainer knows (:class:`Penalty`): IRMv1 and V-REx.
PENALTIES: tuple[str, ...] = ("irm", "vrex")

#: Examples per forward pass when evaluating.
_EVAL_CHUNK = 4096


def check_loss(loss: str) -> str:
    """``loss`` if it is one of :data:`LOSSES`, else a ``ValueError`` naming it.

    Example:
        >>> from gradand.experiments.training import check_loss
        >>> check_loss("ce")
        'ce'
        >>> check_loss("mse")
        Traceback (most recent call last):
        ...
        ValueError: loss must be 'bce' or 'ce'; got 'mse'
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be 'bce' or 'ce'; got {loss!r}")
    return loss


class MLPSpec(dict):
    """The MLP's shape: ``in_features``, ``out_features``, ``hidden_units``, ``hidden_layers``,
    ``dropout``, ``batch_norm``, ``activation`` (``"leaky_relu"`` or ``"relu"``).

    The reference code's MLP: Linear → [BatchNorm] → activation → [Dropout],
    repeated, then a Linear output layer; Kaiming-normal weights, biases 0.01.
    A :class:`Backend` builds it (``backend.build(spec, seed=...)``).

    Example:
        >>> from gradand.experiments.training import MLPSpec
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


class CNNSpec(dict):
    """A small CNN for 32×32 images: ``in_channels``, ``n_classes``, ``width``.

    Two conv–ReLU–max-pool blocks and one hidden linear layer, no
    normalisation layers (PyTorch only).

    Example:
        >>> from gradand.experiments.training import CNNSpec
        >>> CNNSpec(in_channels=3, n_classes=10)
        {'in_channels': 3, 'n_classes': 10, 'width': 32}
    """

    def __init__(self, *, in_channels: int, n_classes: int, width: int = 32) -> None:
        super().__init__(in_channels=in_channels, n_classes=n_classes, width=width)


@runtime_checkable
class Trainer(Protocol):
    """One model and its optimizer in one framework: what :func:`fit` needs, and nothing else.

    Inputs and labels are put on the device once (:meth:`put`); a step's
    batch is gathered there (:meth:`take`). :meth:`step` may return a lazy
    value (a device scalar): :func:`fit` reads the values only at the end, so
    the device is not synchronised every step. ``model`` is the model being
    trained, in the framework's idiom.

    Example:
        >>> import numpy as np
        >>> from gradand.experiments.training import Trainer
        >>> class Majority:  # a "model" that predicts the most frequent label seen so far
        ...     def __init__(self): self.model = self.counts = np.zeros(2)
        ...     def put(self, array): return np.asarray(array)
        ...     def take(self, array, index): return array[index]
        ...     def set_learning_rate(self, rate): pass
        ...     def step(self, x, y): self.counts += np.bincount(y.astype(int).ravel(), minlength=2)
        ...     def predict(self, x): return np.full(len(x), self.counts.argmax())
        >>> isinstance(Majority(), Trainer)
        True
    """

    model: Any

    def put(self, array: np.ndarray) -> Any:
        """``array`` as the framework's array on the trainer's device (called once per array)."""

    def take(self, array: Any, index: np.ndarray) -> Any:
        """``array[index]`` on the device: ``index`` (E, b) of rows of ``array`` gives (E, b, ...)."""

    def set_learning_rate(self, rate: float) -> None:
        """The optimizer's learning rate from now on (called before the first step)."""

    def step(self, x: Any, y: Any) -> Any:
        """One optimisation step on a batch of environments ``x`` (E, b, ...), ``y`` (E, b).

        Returns the fraction of gradient components the combiner kept (a
        number or a device scalar), or ``None`` when nothing is masked.
        """

    def predict(self, x: Any) -> np.ndarray:
        """Predicted labels (numpy) of the inputs ``x`` (N, ...) in evaluation mode."""


class Penalty(NamedTuple):
    """An invariance penalty added to the mean of the environments' losses: a method, not a combiner.

    The objective of one step over environments e = 1..E (``L_e``: the mean loss
    over environment e's examples in the step's batch) is::

        scale · (mean_e L_e + w · P)        (w, scale) = penalty.factors(step)

    - ``kind="vrex"`` (V-REx, Krueger et al. 2021): ``P = mean_e (L_e − mean L)²``,
      the variance of the environments' losses (``ddof=0``, as DomainBed's ``VREx``).
    - ``kind="irm"`` (IRMv1, Arjovsky et al. 2019): ``P = mean_e (∂L_e(s · f(x))/∂s |_{s=1})²``,
      the squared gradient of each environment's loss with respect to a dummy scale
      ``s`` of the logits, by the framework's autodiff (a gradient of a gradient).
      The gradient is taken on the environment's whole batch, as in the IRM code's
      Colored MNIST ``penalty`` (a biased estimate of the squared expectation, not
      DomainBed's product of two half-batch gradients), and averaged over
      environments as the IRM and DomainBed code do (the paper's ``Σ_e`` is ``E``
      times this: a factor absorbed into ``weight``).

    Annealing, as in the IRM code: the penalty weight is 1 for the first
    ``anneal_steps`` steps and ``weight`` (λ) after; whenever the weight is above 1
    the objective is divided by it (``scale = 1/w``), so the gradient keeps the
    loss's scale. Weight decay and L1 are added to the objective's gradient
    afterwards (:meth:`Backend.trainer`), so unlike in the IRM code they are not
    divided by λ; Adam is not reset when the weight changes.

    Args:
        kind: ``"irm"`` or ``"vrex"``.
        weight: λ ≥ 0 (0 after annealing: plain averaging).
        anneal_steps: steps (≥ 0) with penalty weight 1 before λ applies.

    Example:
        >>> from gradand.experiments.training import Penalty
        >>> p = Penalty("irm", 1000.0, anneal_steps=2)
        >>> [p.factors(step) for step in (0, 1, 2)]
        [(1.0, 1.0), (1.0, 1.0), (1000.0, 0.001)]
        >>> Penalty("vrex", 0.5).factors(0)
        (0.5, 1.0)
        >>> Penalty("fish", 1.0).check()
        Traceback (most recent call last):
        ...
        ValueError: penalty kind must be 'irm' or 'vrex'; got 'fish'
    """

    kind: str
    weight: float
    anneal_steps: int = 0

    def check(self) -> Penalty:
        """The penalty itself if its fields are valid, else a ``ValueError`` naming the field.

        Example:
            >>> from gradand.experiments.training import Penalty
            >>> Penalty("vrex", -1.0).check()
            Traceback (most recent call last):
            ...
            ValueError: penalty weight must be a finite number >= 0; got -1.0
        """
        if self.kind not in PENALTIES:
            raise ValueError(f"penalty kind must be 'irm' or 'vrex'; got {self.kind!r}")
        w = self.weight
        number = isinstance(w, (int, float, np.integer, np.floating)) and not isinstance(w, bool)
        if not number or not 0 <= w < np.inf:
            raise ValueError(f"penalty weight must be a finite number >= 0; got {w!r}")
        a = self.anneal_steps
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or a < 0:
            raise ValueError(f"penalty anneal_steps must be an integer >= 0; got {a!r}")
        return self

    def factors(self, step: int) -> tuple[float, float]:
        """``(penalty weight, objective scale)`` at ``step`` (from 0), as the class docstring says.

        Example:
            >>> from gradand.experiments.training import Penalty
            >>> Penalty("vrex", 100.0, anneal_steps=1).factors(5)
            (100.0, 0.01)
        """
        weight = 1.0 if step < self.anneal_steps else float(self.weight)
        return weight, (1.0 / weight if weight > 1.0 else 1.0)


class TrainOptions(NamedTuple):
    """What a :class:`Trainer` needs besides the model (see :meth:`Backend.trainer`).

    Example:
        >>> import gradand
        >>> from gradand.experiments.training import TrainOptions
        >>> TrainOptions(gradand.Mean(), "bce").device
        'cpu'
    """

    combiner: Combiner
    loss: str
    weight_decay: float = 0.0
    l1: float = 0.0
    seed: int = 0
    device: str = "cpu"
    penalty: Penalty | None = None


class Backend(abc.ABC):
    """A framework's side of the experiments: devices, models, trainers, the patchwork gradient.

    ``get_backend("torch")``, ``get_backend("jax")`` and
    ``get_backend("tensorflow")`` are the three implementations; a new one
    sets :attr:`name` and :attr:`trainer_type` and implements the four
    abstract methods.

    Example:
        >>> from gradand.experiments.training import Backend, get_backend
        >>> backend = get_backend("torch")
        >>> isinstance(backend, Backend), backend.name
        (True, 'torch')
    """

    #: The backend's name in the registry (``gradand.experiments.TRAINING_MODULES``).
    name: str
    #: Its :class:`Trainer`, called as ``trainer_type(model, options)`` with :class:`TrainOptions`.
    trainer_type: Callable[[Any, TrainOptions], Trainer]

    @abc.abstractmethod
    def resolve_device(self, device: str) -> Any:
        """The framework's device for ``cpu``, ``cuda`` or ``cuda:N``; ``ValueError`` if unusable."""

    @abc.abstractmethod
    def build(self, spec: MLPSpec | CNNSpec, *, seed: int) -> Any:
        """The model of ``spec`` in the framework's idiom, initialised from ``seed``."""

    @abc.abstractmethod
    def patchwork_gradient(
        self, combiner: Combiner, x: np.ndarray, y: np.ndarray, *, device: str = "cpu"
    ) -> Callable[[np.ndarray], np.ndarray]:
        """``gradient(w)``: the ``combiner``'s update of the losses ``½ (x_e·w − y_e)²`` (float64)."""

    @abc.abstractmethod
    def dense_layers(self, model: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        """The linear layers of an MLP that :meth:`build` made, input to output, as float64 numpy.

        Each is ``(weight (in, out), bias (out,))``: the model is ``x @ W + b``, the
        activation, ..., the last layer without one. ``ValueError`` for a model with batch
        norm (not a stack of linear layers and activations) or one that is not an MLP.
        Dropout is the identity at evaluation, so it does not matter here.
        """

    def trainer(
        self,
        model: Any,
        *,
        combiner: Combiner,
        loss: str,
        weight_decay: float = 0.0,
        l1: float = 0.0,
        seed: int = 0,
        device: str = "cpu",
        penalty: Penalty | None = None,
    ) -> Trainer:
        """A :class:`Trainer` of ``model`` on ``device``.

        Adam on the ``combiner``'s update of the environments' gradients
        (``Mean()``: the gradient of the mean loss), with L2 ``weight_decay``
        and ``l1 · sign(θ)`` added to that update; ``seed`` seeds the
        training's own randomness where the framework needs one (dropout in JAX).
        With a ``penalty`` (:class:`Penalty`: IRMv1 or V-REx) the update is the
        gradient of the penalised mean loss; the ``combiner`` must then be ``Mean()``.

        Example:
            >>> import gradand
            >>> from gradand.experiments.training import MLPSpec, Trainer, get_backend
            >>> backend = get_backend("torch")
            >>> model = backend.build(MLPSpec(in_features=2, out_features=1, hidden_units=4, hidden_layers=1),
            ...                       seed=0)
            >>> isinstance(backend.trainer(model, combiner=gradand.Mean(), loss="bce"), Trainer)
            True
        """
        if penalty is not None:
            if not isinstance(penalty, Penalty):
                raise ValueError(f"penalty must be a Penalty or None; got {penalty!r}")
            penalty.check()
            if not isinstance(combiner, Mean):
                raise ValueError(
                    f"penalty {penalty.kind!r} is added to the mean of the environments' losses: "
                    f"the combiner must be Mean(); got {combiner!r}"
                )
        options = TrainOptions(combiner, check_loss(loss), weight_decay, l1, seed, device, penalty)
        return self.trainer_type(model, options)


def get_backend(name: str) -> Backend:
    """The :class:`Backend` called ``name`` (``torch``, ``jax`` or ``tensorflow``).

    Its module is imported now, its framework when it is first used: a
    framework that is not installed gives an ``ImportError`` saying what to
    install.

    Example:
        >>> from gradand.experiments.training import get_backend
        >>> get_backend("jax").name
        'jax'
        >>> get_backend("mxnet")
        Traceback (most recent call last):
        ...
        ValueError: backend must be one of ['jax', 'tensorflow', 'torch']; got 'mxnet'
    """
    if name not in TRAINING_MODULES:
        raise ValueError(f"backend must be one of {sorted(TRAINING_MODULES)}; got {name!r}")
    return importlib.import_module(TRAINING_MODULES[name]).BACKEND


def learning_rate(
    epoch: int, *, lr: float, epochs: int, lr_milestone: float | None, lr_decay: float
) -> float:
    """The learning rate of ``epoch`` (from 0): ``lr``, × ``lr_decay`` after ``lr_milestone`` of the epochs.

    Example:
        >>> from gradand.experiments.training import learning_rate
        >>> [learning_rate(e, lr=1.0, epochs=4, lr_milestone=0.75, lr_decay=0.1) for e in range(4)]
        [1.0, 1.0, 1.0, 0.1]
    """
    if lr_milestone is not None and epoch >= max(1, int(lr_milestone * epochs)):
        return lr * lr_decay
    return lr


def fit(
    trainer: Trainer,
    *,
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_sets: dict[str, tuple[np.ndarray, np.ndarray]],
    epochs: int,
    batch_size: int,
    lr: float,
    envs_per_step: int | None = None,
    lr_milestone: float | None = None,
    lr_decay: float = 0.1,
    eval_every: int = 1,
    seed: int = 0,
    show_progress: bool = True,
    desc: str = "",
) -> dict[str, Any]:
    """Train ``trainer`` on environments ``train_x`` (E, n, ...); the experiments' loop.

    Every step takes ``batch_size`` examples from each of ``envs_per_step``
    environments (all of them by default): a fresh permutation of each
    environment's examples, and of the environments, every epoch, drawn by
    ``numpy.random.default_rng(seed)`` (the same batches in every
    backend); partial batches are dropped, as the reference code's data
    loaders do. Every example its own environment is ``train_x`` of shape
    (N, 1, ...) with ``batch_size=1`` and ``envs_per_step`` the number of
    examples per step. The learning rate is ``lr``, × ``lr_decay`` once
    ``lr_milestone`` of the epochs are done (:func:`learning_rate`).

    Args:
        trainer: a :class:`Trainer` (e.g. ``get_backend("torch").trainer(model, ...)``).
        train_x, train_y: (E, n, ...) inputs and (E, n) labels.
        eval_sets: name → (inputs (N, ...), labels (N,)) evaluated every
            ``eval_every`` epochs and at the end.
        epochs, batch_size, lr, envs_per_step, lr_milestone, lr_decay: as above.
        eval_every: evaluation period in epochs.
        seed: the shuffling seed.
        show_progress: a progress bar over steps.
        desc: the bar's label.

    Returns:
        ``{"final": {name: accuracy}, "curve": {"epoch": [...], name: [...]},
        "survivor_fraction": mean over steps of what the combiner kept (1 for
        ``Mean()``), "steps": int, "seconds": training time}``.

    Example:
        >>> import numpy as np, gradand
        >>> from gradand.experiments.training import MLPSpec, fit, get_backend
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((2, 16, 3)).astype(np.float32)
        >>> y = (x[..., 0] > 0).astype(np.float32)
        >>> torch_backend = get_backend("torch")
        >>> model = torch_backend.build(MLPSpec(in_features=3, out_features=1, hidden_units=8,
        ...                                     hidden_layers=1), seed=0)
        >>> trainer = torch_backend.trainer(model, combiner=gradand.AndMask(0.5), loss="bce")
        >>> out = fit(trainer, train_x=x, train_y=y, eval_sets={"train": (x.reshape(-1, 3), y.reshape(-1))},
        ...           epochs=2, batch_size=8, lr=1e-2, show_progress=False)
        >>> sorted(out["final"]), out["steps"], 0 < out["survivor_fraction"] <= 1
        (['train'], 4, True)
    """
    n_envs, n_per_env = train_x.shape[0], train_x.shape[1]
    _, group, groups_per_epoch, steps_per_epoch = epoch_schedule(n_envs, n_per_env, batch_size, envs_per_step)
    # Rows of the flattened (E * n, ...) arrays: a step's batch is one gather on the device.
    x_all = trainer.put(train_x.reshape(n_envs * n_per_env, *train_x.shape[2:]))
    y_all = trainer.put(train_y.reshape(n_envs * n_per_env, *train_y.shape[2:]))
    evals = {name: (trainer.put(ex), np.asarray(ey)) for name, (ex, ey) in eval_sets.items()}
    curve: dict[str, list[float]] = {"epoch": [], **{name: [] for name in evals}}
    kept: list[Any] = []
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    total = epochs * steps_per_epoch
    bar = progress(range(total), total=total, desc=desc, enabled=show_progress)
    ticks = iter(bar)
    rate = None
    for epoch in range(epochs):
        new_rate = learning_rate(epoch, lr=lr, epochs=epochs, lr_milestone=lr_milestone, lr_decay=lr_decay)
        if new_rate != rate:
            trainer.set_learning_rate(new_rate)
            rate = new_rate
        perm = np.argsort(rng.random((n_envs, n_per_env)), axis=1)
        env_order = rng.permutation(n_envs) if group < n_envs else np.arange(n_envs)
        for s in range(steps_per_epoch):
            next(ticks, None)
            b, g = divmod(s, groups_per_epoch)
            envs = env_order[g * group : (g + 1) * group]
            rows = envs[:, None] * n_per_env + perm[envs, b * batch_size : (b + 1) * batch_size]
            survivors = trainer.step(trainer.take(x_all, rows), trainer.take(y_all, rows))
            if survivors is not None:
                kept.append(survivors)
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            curve["epoch"].append(epoch + 1)
            for name, (ex, ey) in evals.items():
                chunks = [trainer.predict(ex[i : i + _EVAL_CHUNK]) for i in range(0, len(ey), _EVAL_CHUNK)]
                pred = np.concatenate(chunks) if chunks else np.zeros(0)
                curve[name].append(float(np.mean(pred == ey)) if len(ey) else 0.0)
    if hasattr(bar, "close"):
        bar.close()
    return {
        "final": {name: curve[name][-1] for name in evals},
        "curve": curve,
        "survivor_fraction": float(np.mean([float(k) for k in kept])) if kept else 1.0,
        "steps": total,
        "seconds": time.perf_counter() - start,
    }


def train_classifier(
    model: Any,
    *,
    backend: str | Backend = "torch",
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
    init_seed: int | None = None,
    device: str = "cpu",
    show_progress: bool = True,
    desc: str = "",
    penalty: Penalty | None = None,
) -> dict[str, Any]:
    """Train ``model`` with ``combiner`` in ``backend``: the trainer of :class:`Backend`, then :func:`fit`.

    Adam with L2 ``weight_decay`` added to the combined gradient (so it also
    acts on masked components, as in the reference code) and ``l1 · sign(θ)``
    added to it too. ``Mean()`` trains on the gradient of the mean of the
    environments' losses (one ordinary backward pass; batch norm sees the
    whole step's batch, as in the reference code); any other combiner goes
    through the backend's factored path (one forward and one backward pass,
    per-environment gradient statistics per layer).

    Args:
        model: an :class:`MLPSpec` or :class:`CNNSpec` (built by the backend
            from ``init_seed``), or a model in the backend's idiom (a
            ``torch.nn.Module``, a Keras model, the JAX backend's built model).
        backend: ``"torch"``, ``"jax"``, ``"tensorflow"`` or a :class:`Backend`.
        train_x, train_y: (E, n, ...) inputs and (E, n) labels (float {0, 1} for
            ``loss="bce"``, integer classes for ``loss="ce"``).
        eval_sets, epochs, batch_size, lr, envs_per_step, lr_milestone, lr_decay,
            eval_every, show_progress, desc: as in :func:`fit`.
        combiner: ``gradand.Mean()``, ``gradand.AndMask(...)``, ...
        loss: ``"bce"`` (one logit) or ``"ce"`` (class logits).
        weight_decay, l1: as above.
        seed: the shuffling seed (batches, and dropout in JAX).
        init_seed: the initialisation seed of a spec (default ``seed``).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        penalty: an invariance penalty (:class:`Penalty`: IRMv1 or V-REx) added to
            the mean loss; the ``combiner`` must be ``Mean()``.

    Returns:
        :func:`fit`'s result and ``"model"``: the trained model in the backend's idiom.

    Example:
        >>> import numpy as np, gradand
        >>> from gradand.experiments.training import MLPSpec, train_classifier
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((2, 16, 3)).astype(np.float32)
        >>> y = (x[..., 0] > 0).astype(np.float32)
        >>> spec = MLPSpec(in_features=3, out_features=1, hidden_units=8, hidden_layers=1)
        >>> out = train_classifier(spec, backend="jax", train_x=x, train_y=y,
        ...     eval_sets={"train": (x.reshape(-1, 3), y.reshape(-1))}, combiner=gradand.AndMask(0.5),
        ...     loss="bce", epochs=2, batch_size=8, lr=1e-2, show_progress=False)
        >>> sorted(out["final"]), out["steps"]
        (['train'], 4)
    """
    check_loss(loss)
    impl = get_backend(backend) if isinstance(backend, str) else backend
    if isinstance(model, (MLPSpec, CNNSpec)):
        model = impl.build(model, seed=seed if init_seed is None else init_seed)
    trainer = impl.trainer(
        model,
        combiner=combiner,
        loss=loss,
        weight_decay=weight_decay,
        l1=l1,
        seed=seed,
        device=device,
        penalty=penalty,
    )
    out = fit(
        trainer,
        train_x=train_x,
        train_y=train_y,
        eval_sets=eval_sets,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        envs_per_step=envs_per_step,
        lr_milestone=lr_milestone,
        lr_decay=lr_decay,
        eval_every=eval_every,
        seed=seed,
        show_progress=show_progress,
        desc=desc,
    )
    return {**out, "model": trainer.model}
