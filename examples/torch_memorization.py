"""Every example its own environment: the AND-mask learns a rule but does not memorise noise.

The paper's memorisation experiment in miniature. An MLP is trained on 512 points
twice: with labels that follow a rule (y = [x0 + x1 > 0]) and with random labels.
Each minibatch example is its own environment (inputs shaped (B, 1, ...) for
gt.model_backward). Plain averaging fits both, memorising the random labels; the
AND-mask only follows gradient directions that most examples agree on, so it learns
the rule and stays near chance on random labels.

Run: python examples/torch_memorization.py   (about a minute on one CPU core)
"""

import torch

import gradand
from gradand.backends import torch as gt

torch.set_num_threads(1)
F = torch.nn.functional
g = torch.Generator().manual_seed(0)
n, d, batch, steps = 512, 20, 64, 250
x = torch.randn(n, d, generator=g)
labels = {"rule": (x[:, 0] + x[:, 1] > 0).long(), "random": torch.randint(0, 2, (n,), generator=g)}
combiners = {"mean": gradand.Mean(), "and_mask": gradand.AndMask(threshold=0.2)}

print(f"training accuracy after {steps} steps of batch {batch} (every example its own environment)")
print(f"{'labels':<8}{'mean':>8}{'and_mask':>10}")
for label_name, y in labels.items():
    accuracy = {}
    for name, combiner in combiners.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(d, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
            torch.nn.Linear(128, 2),
        )  # fmt: skip
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(steps):
            idx = torch.randint(0, n, (batch,), generator=g)
            optimizer.zero_grad()
            gt.model_backward(model, F.cross_entropy, x[idx, None], y[idx, None], combiner)
            optimizer.step()
        with torch.no_grad():
            accuracy[name] = (model(x).argmax(-1) == y).float().mean().item()
    print(f"{label_name:<8}{accuracy['mean']:>8.3f}{accuracy['and_mask']:>10.3f}")
