"""The experiments' training loops in PyTorch, on :mod:`gradand.backends.torch`.

Per-environment gradients are combined by the backend
(:func:`gradand.backends.torch.model_backward`, :func:`gradand.backends.torch.backward`);
nothing here computes a mask. Plain averaging (``Mean``) needs no
per-environment gradient: the gradient of the mean loss over equally sized
environments *is* the mean of their gradients, so the averaging baselines
train with an ordinary ``loss.backward()`` — exactly what a user who does not
use gradand runs, and the only way to train batch norm in train mode the way
the reference code does (batch statistics over the whole step's batch).

Importing this module without torch installed works (the doctest collector
imports every module); calling it raises a clear error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

try:  # torch is an optional extra
    import torch
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None

from gradand._combiners import Combiner, Mean
from gradand.experiments._report import progress
from gradand.experiments._schedule import schedule as epoch_schedule

__all__ = ["mlp", "resolve_device", "small_cnn", "train_classifier", "train_patchwork"]


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


def _accuracy(model: Any, x: Any, y: Any, batch: int = 4096) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            out = model(x[i : i + batch])
            if out.shape[-1] == 1:
                pred = (out.squeeze(-1) > 0).to(y.dtype)
            else:
                pred = out.argmax(-1)
            correct += int((pred == y[i : i + batch]).sum())
    model.train(was_training)
    return correct / max(int(x.shape[0]), 1)


def train_classifier(
    model: Any,
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
    """Train ``model`` on environments ``train_x`` (E, n, ...) with ``combiner``; return accuracies.

    Every step takes ``batch_size`` examples from each of ``envs_per_step``
    environments (all of them by default): a fresh permutation of each
    environment's examples, and of the environments, every epoch; partial
    batches are dropped, as the reference code's data loaders do. Every
    example its own environment is ``train_x`` of shape (N, 1, ...) with
    ``batch_size=1`` and ``envs_per_step`` the number of examples per step. Adam with L2
    ``weight_decay`` (added to the combined gradient, so it also acts on
    masked components, as in the reference code), optional ``l1 · sign(θ)``
    added to the gradient, learning rate × ``lr_decay`` once ``lr_milestone``
    of the epochs are done.

    Args:
        model: a ``torch.nn.Module`` (moved to ``device``).
        train_x, train_y: (E, n, ...) inputs and (E, n) labels (float {0, 1} for
            ``loss="bce"``, int classes for ``loss="ce"``).
        eval_sets: name → (inputs (N, ...), labels (N,)) evaluated every
            ``eval_every`` epochs and at the end.
        combiner: ``Mean()`` trains on ``loss.backward()`` of the mean loss;
            anything else goes through :func:`gradand.backends.torch.model_backward`
            (one forward and one backward; per-environment gradients per layer).
        loss: ``"bce"`` (one logit) or ``"ce"`` (class logits).
        epochs, batch_size, lr, weight_decay, l1, lr_milestone, lr_decay: as above.
        envs_per_step: environments per step (``None``: all).
        eval_every: evaluation period in epochs.
        seed: seeds the initialisation-independent randomness (batches, dropout).
        device: a torch device string.
        show_progress: a tqdm bar over steps.
        desc: the bar's label.

    Returns:
        ``{"final": {name: accuracy}, "curve": {"epoch": [...], name: [...]},
        "survivor_fraction": mean over steps (1 for Mean), "steps": int,
        "seconds": training time}``.

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
    gt = _need_torch()
    dev = resolve_device(device)
    functional = torch.nn.functional
    if loss == "bce":

        def loss_fn(out: Any, y: Any) -> Any:
            return functional.binary_cross_entropy_with_logits(out.squeeze(-1), y)
    elif loss == "ce":

        def loss_fn(out: Any, y: Any) -> Any:
            return functional.cross_entropy(out, y)
    else:
        raise ValueError(f"loss must be 'bce' or 'ce'; got {loss!r}")

    model = model.to(dev)
    model.train()
    x = torch.as_tensor(train_x, device=dev)
    y = torch.as_tensor(train_y, device=dev)
    if loss == "ce":
        y = y.long()
    n_envs, n_per_env = x.shape[0], x.shape[1]
    _, group, groups_per_epoch, steps_per_epoch = epoch_schedule(n_envs, n_per_env, batch_size, envs_per_step)
    evals = {
        name: (
            torch.as_tensor(ex, device=dev),
            torch.as_tensor(ey, device=dev).long() if loss == "ce" else torch.as_tensor(ey, device=dev),
        )
        for name, (ex, ey) in eval_sets.items()
    }
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    milestones = [] if lr_milestone is None else [max(1, int(lr_milestone * epochs))]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=lr_decay)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    use_mean = isinstance(combiner, Mean)
    curve: dict[str, list[float]] = {"epoch": [], **{name: [] for name in evals}}
    survivors: list[float] = []

    def evaluate(epoch: int) -> None:
        curve["epoch"].append(epoch)
        for name, (ex, ey) in evals.items():
            curve[name].append(_accuracy(model, ex, ey))

    start = time.perf_counter()
    total = epochs * steps_per_epoch
    bar = progress(range(total), total=total, desc=desc, enabled=show_progress)
    it = iter(bar)
    for epoch in range(epochs):
        perm = torch.argsort(torch.rand(n_envs, n_per_env, generator=gen), dim=1).to(dev)
        env_order = torch.randperm(n_envs, generator=gen).to(dev) if group < n_envs else None
        for step in range(steps_per_epoch):
            next(it, None)
            b, g = divmod(step, groups_per_epoch)
            envs = (
                torch.arange(n_envs, device=dev)
                if env_order is None
                else env_order[g * group : (g + 1) * group]
            )
            idx = perm[envs, b * batch_size : (b + 1) * batch_size]
            xb, yb = x[envs[:, None], idx], y[envs[:, None], idx]
            opt.zero_grad(set_to_none=True)
            if use_mean:
                out = model(xb.reshape(-1, *xb.shape[2:]))
                loss_fn(out, yb.reshape(-1, *yb.shape[2:])).backward()
            else:
                result = gt.model_backward(model, loss_fn, xb, yb, combiner, method="factored")
                survivors.append(float(result.summary.survivor_fraction))
            if l1 > 0:
                with torch.no_grad():
                    for p in params:
                        p.grad.add_(torch.sign(p), alpha=l1)
            opt.step()
        sched.step()
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            evaluate(epoch + 1)
    if hasattr(bar, "close"):
        bar.close()
    return {
        "final": {name: curve[name][-1] for name in evals},
        "curve": curve,
        "survivor_fraction": float(np.mean(survivors)) if survivors else 1.0,
        "steps": total,
        "seconds": time.perf_counter() - start,
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
    """The patchwork regression of :mod:`gradand.experiments.patchwork`, in float64 torch.

    One loss per environment, combined into ``.grad`` by
    :func:`gradand.backends.torch.backward`; plain SGD with the notebook's
    decaying learning rate and weight decay added after combining. Returns
    a :class:`~gradand.experiments.patchwork.PatchworkResult`, equal to the
    numpy run up to float round-off.

    Example:
        >>> import gradand
        >>> from gradand.experiments.torch_training import train_patchwork
        >>> train_patchwork(gradand.AndMask(threshold=1.0, rescale=False)).weights.round(2).tolist()
        [0.0, 0.0, 0.0, 0.0, 3.0]
    """
    gt = _need_torch()
    from gradand.experiments.patchwork import PatchworkResult, inputs

    dev = resolve_device(device)
    env = list(environments)
    if not env or any(not 0 <= e < 4 for e in env):
        raise ValueError(f"environments must be a non-empty subset of 0..3; got {environments!r}")
    xn, yn = inputs()
    x = torch.as_tensor(xn, dtype=torch.float64, device=dev)
    y = torch.as_tensor(yn, dtype=torch.float64, device=dev)
    w = torch.zeros(5, dtype=torch.float64, device=dev, requires_grad=True)
    trajectory = [w.detach().cpu().numpy().copy()]
    for _ in range(steps):
        losses = torch.stack([0.5 * (x[e] @ w - y[e]) ** 2 for e in env])
        w.grad = None
        gt.backward(losses, [w], combiner)
        with torch.no_grad():
            w -= lr * (w.grad + weight_decay * w)
        lr *= lr_decay
        trajectory.append(w.detach().cpu().numpy().copy())
    wn = w.detach().cpu().numpy()
    per_env = 0.5 * (xn @ wn - yn) ** 2
    held = [e for e in range(4) if e not in env]
    return PatchworkResult(
        weights=wn,
        trajectory=np.stack(trajectory),
        train_loss=float(per_env[env].mean()),
        heldout_loss=float(per_env[held].mean()) if held else math.nan,
    )
