"""How close the PyTorch per-example factored step is to its floor, side by side in one process.

The per-example workload (the spirals MLP, 128 environments of one example) measured three ways,
interleaved, as ratios to the plain averaged step (forward, backward, Adam):

- ``gradand factored``: ``gt.model_backward(..., method="factored")``, as in ``run.py``;
- ``hand-written floor``: the same arithmetic written for this one model with nothing else —
  one forward pass recording each ``nn.Linear``'s input and output, ``torch.autograd.grad`` to
  the outputs, per layer ``Δᵀ X / B`` and the exact int8 product ``sign(Δ)ᵀ sign(X)``, the
  AND-mask, the rescale and Adam — without gradand's argument checks, NaN policy, per-tensor
  mask information, result summary or support for other layers;
- ``Adam on zero gradients``: the plain step's Adam given all-zero gradients (what the AND-mask
  at τ = 1 leaves of 128 single examples), minus Adam on the plain gradients: PyTorch's CPU
  ``sqrt`` of 0 is about 4× slower than of a positive number.

Run:
    python benchmarks/per_example_floor.py --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import _torch


def hand_written(w: _common.Workload, x: torch.Tensor, y: torch.Tensor):
    model = _torch.model_for(w)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    n = x.shape[0]

    def signs(t: torch.Tensor) -> torch.Tensor:
        return torch.sign(t).to(torch.int8)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        inputs, outputs, h = [], [], x
        for m in model:
            if isinstance(m, torch.nn.Linear):
                inputs.append(h)
                h = m(h)
                outputs.append(h)
            else:
                h = m(h)
        losses = F.binary_cross_entropy_with_logits(h, y, reduction="none").reshape(n, -1).mean(1)
        deltas = torch.autograd.grad(losses.sum(), outputs)
        means, votes = [], []
        for xi, di in zip(inputs, deltas):
            means += [(di.T / n) @ xi, di.sum(0) / n]
            big = di.shape[1] >= 8 and xi.shape[1] >= 8  # torch._int_mm needs sizes of at least 8
            w_votes = torch._int_mm(signs(di.T).contiguous(), signs(xi)) if big else (
                torch.sign(di.T) @ torch.sign(xi)).to(torch.int32)  # fmt: skip
            votes += [w_votes, torch.sign(di).sum(0).to(torch.int32)]
        for p, mean, vote in zip(params, means, votes):
            keep = vote.abs() >= n
            update = (mean * keep.view(torch.uint8)).add_(0.0)
            p.grad = update * (update.numel() / keep.sum().clamp(min=1))
        opt.step()

    return step


def adam_on(zero: bool, w: _common.Workload):
    model = _torch.model_for(w)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    grads = [torch.zeros_like(p) if zero else torch.randn_like(p) * 1e-3 for p in params]

    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=50, help="steps per strategy and round")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _measure(args)
    finally:  # called from another process's code (the tests): its thread count back
        torch.set_num_threads(threads)


def _measure(args: argparse.Namespace) -> None:
    w = _common.workloads(False)["per-example"]
    xs, ys = _common.data(w)
    x, y = torch.from_numpy(xs).reshape(w.envs, -1), torch.from_numpy(ys).reshape(w.envs, -1)
    factored = "gradand factored_backward"
    fns = {
        "plain averaging": _torch.strategies(w, "cpu", only=_torch.PLAIN)[_torch.PLAIN],
        "gradand factored": _torch.strategies(w, "cpu", only=factored)[factored],
        "hand-written floor": hand_written(w, x, y),
        "Adam, random gradients": adam_on(False, w),
        "Adam, zero gradients": adam_on(True, w),
    }
    for f in fns.values():
        for _ in range(min(30, args.steps)):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, f in fns.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                f()
            times[k].append((time.perf_counter() - start) / args.steps)
    plain = times["plain averaging"]
    print(f"per-example (E=128 x 1), 1 thread, {args.rounds} interleaved rounds, medians")
    for k in ("plain averaging", "gradand factored", "hand-written floor"):
        ratio = statistics.median(a / b for a, b in zip(times[k], plain))
        print(f"  {k:20s} {statistics.median(times[k]) * 1e3:6.3f} ms   {ratio:.2f}x plain")
    zero, rand = times["Adam, zero gradients"], times["Adam, random gradients"]
    extra = statistics.median(a - b for a, b in zip(zero, rand))
    print(f"  Adam on zero gradients costs {extra * 1e3:.3f} ms more than on random ones")


if __name__ == "__main__":
    main()
