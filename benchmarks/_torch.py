"""PyTorch strategies: plain averaging, gradand's backends and the baselines written here."""

from __future__ import annotations

from collections.abc import Callable

import torch
from _common import COMBINER, Workload, accepted, data, peak_rss_of

import gradand
from gradand.backends import torch as gt

F = torch.nn.functional
PLAIN = "plain averaging"


def configure(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def versions() -> dict[str, str]:
    return {"torch": torch.__version__}


class BasicBlock(torch.nn.Module):
    """ResNet's basic block: conv 3x3-BN-ReLU-conv 3x3-BN plus the shortcut (1x1 conv + BN if needed)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(torch.nn.Module):
    """ResNet-18 layout (4 stages of 2 BasicBlocks) at ``w.width`` channels in the first stage."""

    def __init__(self, w: Workload) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(
            nn.Conv2d(w.channels, w.width, 3, padding=1, bias=False), nn.BatchNorm2d(w.width), nn.ReLU()
        )
        blocks, cin = [], w.width
        for stage in range(4):
            cout = w.width * 2**stage
            blocks += [BasicBlock(cin, cout, 1 if stage == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, w.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def model_for(w: Workload) -> torch.nn.Module:
    """The workload's model, in train mode (the resnet's BatchNorm uses batch statistics)."""
    torch.manual_seed(0)
    nn = torch.nn
    if w.model == "mlp":
        layers: list[torch.nn.Module] = []
        width = w.inputs
        for _ in range(w.layers):
            layers += [torch.nn.Linear(width, w.hidden), torch.nn.ReLU()]
            width = w.hidden
        return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
    if w.model == "convnet":  # the PyTorch examples' MNIST net, without dropout
        flat = 64 * ((w.image - 4) // 2) ** 2
        return nn.Sequential(
            nn.Conv2d(w.channels, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(flat, w.hidden), nn.ReLU(), nn.Linear(w.hidden, w.classes),
        )  # fmt: skip
    if w.model == "resnet":
        return ResNet(w)
    flat = 32 * (w.image // 4) ** 2
    return torch.nn.Sequential(
        torch.nn.Conv2d(w.channels, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(flat, w.classes),
    )  # fmt: skip


def loss_for(w: Workload) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return F.binary_cross_entropy_with_logits if w.model == "mlp" else F.cross_entropy


def _write_combined(params: list[torch.Tensor], per_env: list[list[torch.Tensor]]) -> None:
    """Baselines: stack each parameter's per-environment gradients and combine them with the core."""
    for p, grads in zip(params, per_env):
        stacked = grads if isinstance(grads, torch.Tensor) else torch.stack(grads)
        p.grad = gradand.combine(stacked, COMBINER)


def strategies(w: Workload, device: str, only: str | None = None) -> dict[str, Callable[[], object]]:
    """One full training step per strategy (zero_grad, forward, gradients, combine, Adam step).

    Each gradand strategy runs one step here; one its backend refuses for this model
    (``ValueError``, e.g. ``method="vectorized"`` with BatchNorm in train mode) is
    left out (``_common.accepted``). ``only``: build just that strategy (memory measurements).
    """
    xs, ys = data(w)
    x, y = torch.from_numpy(xs).to(device), torch.from_numpy(ys).to(device)
    E = w.envs
    flat_x, flat_y = x.reshape(E * w.examples, *x.shape[2:]), y.reshape(E * w.examples, *y.shape[2:])
    loss_fn = loss_for(w)
    chunk = max(1, E // 4)

    def plain(model, params):
        loss = loss_fn(model(flat_x), flat_y)
        loss.backward()
        return loss

    def micro_batches(model, params):  # ordinary training split into E micro-batches (gradient accumulation)
        for e in range(E):
            (loss_fn(model(x[e]), y[e]) / E).backward()

    def streaming(model, params):
        gt.backward([loss_fn(model(x[e]), y[e]) for e in range(E)], params, COMBINER)

    def vmap(model, params):
        return gt.model_backward(model, loss_fn, x, y, COMBINER, method="vectorized").loss

    def vmap_chunked(model, params):
        return gt.model_backward(model, loss_fn, x, y, COMBINER, method="vectorized", chunk_size=chunk).loss

    def factored(model, params):
        return gt.model_backward(model, loss_fn, x, y, COMBINER, method="factored").loss

    def retain_graph_loop(model, params):  # the paper's reference code: E backward passes over one forward
        out = model(flat_x)
        out = out.reshape(E, w.examples, *out.shape[1:])
        losses = [loss_fn(out[e], y[e]) for e in range(E)]
        grads = [torch.autograd.grad(losses[e], params, retain_graph=e < E - 1) for e in range(E)]
        _write_combined(params, [list(g) for g in zip(*grads)])

    def forward_loop(model, params):  # DomainBed style: a forward and a backward per environment
        grads = [torch.autograd.grad(loss_fn(model(x[e]), y[e]), params) for e in range(E)]
        _write_combined(params, [list(g) for g in zip(*grads)])

    def stacked_jacobian(model, params):  # TorchJD style: one batched backward of the E losses
        out = model(flat_x)
        out = out.reshape(E, w.examples, *out.shape[1:])
        losses = torch.stack([loss_fn(out[e], y[e]) for e in range(E)])
        eye = torch.eye(E, device=losses.device, dtype=losses.dtype)
        jac = torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True)
        _write_combined(params, list(jac))

    fns = {
        PLAIN: plain,
        f"plain, {E} micro-batches": micro_batches,
        "gradand backward (streaming, forward per env)": streaming,
        "gradand vmap_backward": vmap,
        f"gradand vmap_backward(chunk_size={chunk})": vmap_chunked,
    }
    fns["gradand factored_backward"] = factored  # labels kept: compared with the committed results
    baselines = {
        "baseline: retain_graph loop (reference code)": retain_graph_loop,
        "baseline: forward+backward per env (DomainBed)": forward_loop,
        "baseline: stacked Jacobian (TorchJD)": stacked_jacobian,
    }
    if w.model == "resnet":  # the retain_graph loop and TorchJD forward the whole batch at once, so
        # their BatchNorm statistics would mix the environments: only DomainBed's matches gradand's
        baselines = {k: v for k, v in baselines.items() if "DomainBed" in k}
    fns |= baselines
    steps = {}
    for name, fn in fns.items():
        if only is not None and name != only:
            continue
        model = model_for(w).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-3)
        steps[name] = _step(fn, model, params, opt)
    return accepted("torch", w, steps, lambda name, step: step())


def _step(fn, model, params, opt) -> Callable[[], object]:
    def step() -> object:
        opt.zero_grad(set_to_none=True)
        fn(model, params)
        opt.step()
        return params[0]

    return step


def sync(out: object) -> None:
    if isinstance(out, torch.Tensor) and out.is_cuda:
        torch.cuda.synchronize()


def peak_memory(w: Workload, strategy: str, device: str) -> float:
    """Peak memory in bytes of a process (CPU: ``ru_maxrss``) or of CUDA allocations running ``strategy``."""
    step = strategies(w, device, only=strategy)[strategy]
    if device.startswith("cuda"):
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    step()
    return peak_rss_of(step, steps=3)
