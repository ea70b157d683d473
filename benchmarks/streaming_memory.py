"""Peak tensor memory of one streaming step (``gt.backward``), in units of the model's parameters.

Allocations of torch's CPU allocator recorded by ``torch.profiler`` (``profile_memory=True``)
during one step of a 1 M-parameter MLP, one forward and backward pass per environment, summed in
time order: the peak while the environments are folded in (each environment's gradient into two
accumulators) and the peak over the whole step (with the finalize's temporaries).

Run:
    python benchmarks/streaming_memory.py            # E=8, a 1024 x 1024 layer
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import gradand
from gradand.backends import torch as gt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", type=int, default=8)
    p.add_argument("--width", type=int, default=1024)
    args = p.parse_args()
    torch.manual_seed(0)
    n, e = args.width, args.envs
    model = torch.nn.Sequential(torch.nn.Linear(n, n), torch.nn.Linear(n, 1))
    params = list(model.parameters())
    x, y = torch.randn(e, 2, n), torch.randn(e, 2, 1)

    def losses() -> list[torch.Tensor]:
        return [torch.nn.functional.mse_loss(model(x[k]), y[k]) for k in range(e)]

    def source() -> None:  # the fold alone: each environment's gradient into the accumulators
        gt.streaming_statistics(losses(), params, gradand.AndMask(threshold=1.0))

    def step() -> None:  # the whole step: the fold, then the finalize into .grad
        for q in params:
            q.grad = None
        gt.backward(losses(), params, gradand.AndMask(threshold=1.0))

    size = sum(q.numel() * q.element_size() for q in params)
    print(f"parameters: {size / 2**20:.2f} MB, {e} environments")
    for name, fn in (("streaming_statistics (the fold)", source), ("backward (fold + finalize)", step)):
        print(f"{name}: peak of its own allocations {_peak(fn) / size:.2f}x the parameters")


def _peak(fn) -> int:
    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    current = peak = 0
    for _, nbytes in sorted((ev.start_ns(), ev.nbytes()) for ev in events if ev.name() == "[memory]"):
        current += nbytes
        peak = max(peak, current)
    return peak

if __name__ == "__main__":
    main()
