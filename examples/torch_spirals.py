"""The paper's spirals task in an ordinary PyTorch loop: averaging memorises, the AND-mask generalises.

16 training environments share the invariant mechanism (two interleaved spirals in
the first two inputs) but each has its own shortcut: four more inputs equal to
s_e * (2y - 1) for a random vector s_e per environment, perfectly predictive inside
that environment and useless elsewhere. At test time the shortcut inputs are noise.
Averaging the environments' gradients sews the shortcuts into a patchwork (perfect
training accuracy, chance at test); the AND-mask keeps only the directions on which
most environments agree, which the shortcuts are not.

The change to the usual loop: one loss per environment, and gt.backward(losses,
params, combiner) instead of loss.backward().

Run: python examples/torch_spirals.py   (about a minute on one CPU core)
"""

import math

import torch

import gradand
from gradand.backends import torch as gt


def spirals(n_envs, n, shortcut_dims=4, seed=0, test=False):
    """(n_envs, n, 2 + shortcut_dims) inputs and (n_envs, n) labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n_envs, n), generator=g)
    r = 0.08 + 0.92 * torch.rand(n_envs, n, generator=g)
    angle = 2 * math.pi * r + math.pi * y  # one revolution per spiral, the label picks the arm
    spiral = torch.stack([r * angle.cos(), r * angle.sin()], dim=-1)
    if test:
        shortcut = torch.randn(n_envs, n, shortcut_dims, generator=g)
    else:
        shortcut = torch.randn(n_envs, 1, shortcut_dims, generator=g) * (2 * y[..., None] - 1)
    return torch.cat([spiral, shortcut], dim=-1), y


torch.set_num_threads(1)
F = torch.nn.functional
x, y = spirals(n_envs=16, n=128)
x_test, y_test = spirals(n_envs=1, n=2000, seed=1, test=True)

for name, combiner in {"mean": gradand.Mean(), "and_mask": gradand.AndMask(threshold=0.7)}.items():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(1000):
        optimizer.zero_grad()
        losses = [F.cross_entropy(model(x[e]), y[e]) for e in range(len(x))]  # one loss per environment
        result = gt.backward(losses, model.parameters(), combiner)  # instead of loss.backward()
        optimizer.step()
        if step % 250 == 0:
            kept = float(result.summary.survivor_fraction)
            print(f"{name:>8} step {step:4d}  loss {float(result.loss):.3f}  kept {kept:.3f}")
    with torch.no_grad():
        train = (model(x).argmax(-1) == y).float().mean().item()
        test = (model(x_test).argmax(-1) == y_test).float().mean().item()
    print(f"{name:>8}: train accuracy {train:.3f}, test accuracy (shortcuts shuffled) {test:.3f}")
