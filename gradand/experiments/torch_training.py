"""The experiments' PyTorch backend (a :class:`gradand.experiments.training.Backend`).

Per-environment gradients are combined by the backend
(:func:`gradand.backends.torch.model_backward` with ``method="factored"``,
:func:`gradand.backends.torch.backward`); nothing here computes a mask. Plain
averaging (``Mean``) needs no per-environment gradient: the gradient of the
mean loss over equally sized environments *is* the mean of their gradients,
so the averaging baselines train with an ordinary ``loss.backward()`` —
exactly what a user who does not use gradand runs, and the only way to train
batch norm in train mode the way the reference code does (batch statistics
over the whole step's batch). The training loop is
:func:`gradand.experiments.training.fit`.

Importing this module without torch installed works (the doctest collector
imports every module); calling it raises a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

try:  # torch is an optional extra
    import torch
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None

from gradand._combiners import Combiner, Mean
from gradand.experiments import training

__all__ = ["BACKEND", "mlp", "resolve_device", "small_cnn", "train_classifier", "train_patchwork"]


def _need_torch() -> Any:
    if torch is None:
        raise ImportError("the PyTorch backend needs torch: pip install 'gradand[torch]'")
    from gradand.backends import torch as gt

    return gt


def resolve_device(device: str) -> Any:
    """A ``torch.device`` for ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``), checked to be usable.

    Example:
        >>> from gradand.experiments.torch_training import resolve_device
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    _need_torch()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"--device {device!r} is not a torch device (expected cpu, cuda or cuda:N)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"--device {device!r}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r}: expected cpu, cuda, cuda:N or mps")
    return dev


def mlp(
    in_features: int,
    out_features: int,
    *,
    hidden_units: int,
    hidden_layers: int,
    dropout: float = 0.0,
    batch_norm: bool = False,
    activation: str = "leaky_relu",
) -> Any:
    """The reference code's MLP: Linear → [BatchNorm] → activation → [Dropout], repeated; Kaiming init.

    Weights are Kaiming-normal, biases 0.01, as in the reference code.

    Example:
        >>> import torch
        >>> from gradand.experiments.torch_training import mlp
        >>> _ = torch.manual_seed(0)
        >>> net = mlp(10, 1, hidden_units=8, hidden_layers=2)
        >>> net(torch.zeros(3, 10)).shape
        torch.Size([3, 1])
    """
    _need_torch()
    nn = torch.nn
    act = {"leaky_relu": nn.LeakyReLU, "relu": nn.ReLU}[activation]
    layers: list[Any] = []
    width = in_features
    for _ in range(hidden_layers):
        layers.append(nn.Linear(width, hidden_units))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_units))
        layers.append(act())
        if dropout > 0:
            layers.append(nn.Dropout(p=dropout))
        width = hidden_units
    layers.append(nn.Linear(width, out_features))
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.constant_(m.bias, 0.01)
    return net


def small_cnn(in_channels: int, n_classes: int, *, width: int = 32) -> Any:
    """A small CNN for 32×32 images (two conv–ReLU–max-pool blocks, one hidden linear layer).

    No normalisation layers: every example is its own environment in the
    memorisation experiment, and batch statistics are ill-defined per example.

    Example:
        >>> import torch
        >>> from gradand.experiments.torch_training import small_cnn
        >>> small_cnn(3, 10, width=4)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    _need_torch()
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, n_classes),
    )


def _example_losses(kind: str, out: Any, y: Any) -> Any:
    """Per-example losses of logits ``out`` (..., k) and labels ``y`` (...)."""
    functional = torch.nn.functional
    if kind == "bce":
        return functional.binary_cross_entropy_with_logits(out[..., 0], y, reduction="none")
    return functional.cross_entropy(out.movedim(-1, 1), y, reduction="none")


class _Trainer:
    """:class:`gradand.experiments.training.Trainer` of a ``torch.nn.Module`` (Adam)."""

    def __init__(self, model: Any, options: training.TrainOptions) -> None:
        combiner, loss, weight_decay, l1, _, device, penalty = options  # dropout: build()'s seeded stream
        self._gt = _need_torch()
        self._kind = loss
        self._device = resolve_device(device)
        self.model = model.to(self._device)
        self.model.train()
        self._combiner, self._l1 = combiner, l1
        self._penalty, self._steps = penalty, 0
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._opt = torch.optim.Adam(self._params, lr=0.0, betas=(0.9, 0.999), weight_decay=weight_decay)

    def put(self, array: np.ndarray) -> Any:
        t = torch.as_tensor(array, device=self._device)
        return t if t.is_floating_point() else t.long()

    def take(self, array: Any, index: np.ndarray) -> Any:
        return array[torch.as_tensor(index, device=self._device)]

    def set_learning_rate(self, rate: float) -> None:
        for group in self._opt.param_groups:
            group["lr"] = rate

    def _env_loss(self, out: Any, y: Any) -> Any:
        return _example_losses(self._kind, out, y).mean()

    def gradients(self, x: Any, y: Any) -> Any:
        """The objective, in one place: gradients into ``.grad``; the kept fraction (or ``None``)."""
        if isinstance(self._combiner, Mean):
            out = self.model(x.reshape(-1, *x.shape[2:]))
            out = out.reshape(*x.shape[:2], *out.shape[1:])
            if self._penalty is None:
                _example_losses(self._kind, out, y).mean(1).mean().backward()
                return None
            weight, scale = self._penalty.factors(self._steps)
            self._steps += 1
            if self._penalty.kind == "irm":  # IRMv1: d L_e(s · logits) / ds at s = 1, per environment
                s = torch.ones(x.shape[0], dtype=out.dtype, device=out.device, requires_grad=True)
                losses = _example_losses(self._kind, out * s.view(-1, *[1] * (out.dim() - 1)), y).mean(1)
                (ds,) = torch.autograd.grad(losses.sum(), s, create_graph=True)
                term = (ds**2).mean()
            else:  # V-REx: the variance of the environments' losses
                losses = _example_losses(self._kind, out, y).mean(1)
                term = ((losses - losses.mean()) ** 2).mean()
            ((losses.mean() + weight * term) * scale).backward()
            return None
        result = self._gt.model_backward(
            self.model, self._env_loss, x, y, self._combiner, method="factored", nan_policy="propagate"
        )
        return result.summary.survivor_fraction

    def step(self, x: Any, y: Any) -> Any:
        self._opt.zero_grad(set_to_none=True)
        kept = self.gradients(x, y)
        if self._l1 > 0:
            with torch.no_grad():
                for p in self._params:
                    p.grad.add_(torch.sign(p), alpha=self._l1)
        self._opt.step()
        return kept

    def predict(self, x: Any) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.model(x)
        self.model.train(was_training)
        pred = (out[..., 0] > 0).float() if self._kind == "bce" else out.argmax(-1)
        return pred.cpu().numpy()


class _Backend(training.Backend):
    """The PyTorch :class:`gradand.experiments.training.Backend` (``BACKEND``)."""

    trainer_type = _Trainer
    name = "torch"
    resolve_device = staticmethod(resolve_device)

    def build(self, spec: training.MLPSpec | training.CNNSpec, *, seed: int) -> Any:
        _need_torch()
        torch.manual_seed(seed)  # the initialisation, and the stream dropout draws from afterwards
        if isinstance(spec, training.CNNSpec):
            return small_cnn(spec["in_channels"], spec["n_classes"], width=spec["width"])
        return mlp(**spec)

    def patchwork_gradient(
        self, combiner: Combiner, x: np.ndarray, y: np.ndarray, *, device: str = "cpu"
    ) -> Callable[[np.ndarray], np.ndarray]:
        gt = _need_torch()
        dev = resolve_device(device)
        xt = torch.as_tensor(x, dtype=torch.float64, device=dev)
        yt = torch.as_tensor(y, dtype=torch.float64, device=dev)

        def gradient(w: np.ndarray) -> np.ndarray:
            wt = torch.tensor(w, dtype=torch.float64, device=dev, requires_grad=True)
            gt.backward(
                torch.stack([0.5 * (xt[e] @ wt - yt[e]) ** 2 for e in range(len(xt))]), [wt], combiner
            )
            return wt.grad.cpu().numpy()

        return gradient

    def dense_layers(self, model: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        _need_torch()
        modules = list(model.modules())
        other = [type(m).__name__ for m in modules if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm,
                                                                     torch.nn.modules.conv._ConvNd))]
        if other:
            raise ValueError(f"model must be an MLP without batch norm; it has {other[0]}")
        return [
            (m.weight.detach().cpu().double().numpy().T.copy(), m.bias.detach().cpu().double().numpy())
            for m in modules
            if isinstance(m, torch.nn.Linear)
        ]


#: The PyTorch backend of the experiments (``training.get_backend("torch")``).
BACKEND = _Backend()


def train_classifier(model: Any, **options: Any) -> dict[str, Any]:
    """:func:`gradand.experiments.training.train_classifier` with ``backend="torch"`` (same arguments).

    Example:
        >>> import numpy as np, torch, gradand
        >>> from gradand.experiments.torch_training import mlp, train_classifier
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((2, 16, 3)).astype(np.float32)
        >>> y = (x[..., 0] > 0).astype(np.float32)
        >>> _ = torch.manual_seed(0)
        >>> out = train_classifier(mlp(3, 1, hidden_units=8, hidden_layers=1), train_x=x, train_y=y,
        ...     eval_sets={"train": (x.reshape(-1, 3), y.reshape(-1))}, combiner=gradand.AndMask(0.5),
        ...     loss="bce", epochs=2, batch_size=8, lr=1e-2, show_progress=False)
        >>> sorted(out["final"]), out["steps"]
        (['train'], 4)
    """
    return training.train_classifier(model, backend=BACKEND, **options)


def train_patchwork(combiner: Combiner, **options: Any) -> Any:
    """:func:`gradand.experiments.patchwork.train` on PyTorch (float64; ``device=`` as the others).

    Example:
        >>> import gradand
        >>> from gradand.experiments.torch_training import train_patchwork
        >>> train_patchwork(gradand.AndMask(threshold=1.0, rescale=False)).weights.round(2).tolist()
        [0.0, 0.0, 0.0, 0.0, 3.0]
    """
    from gradand.experiments.patchwork import train

    return train(combiner, backend="torch", **options)
