"""Step time of AND-masked training vs a plain-averaging step on the spirals MLP (PyTorch, CPU).

16 environments x 256 examples, 2 spiral + 4 shortcut inputs, 3 hidden layers of 256.
Each strategy runs one full training step (zero_grad, gradients, optimizer.step());
strategies are interleaved round by round in one process and the median is reported,
as a ratio to the plain step. One thread (torch.set_num_threads(1)).

Run: python examples/torch_step_time.py [--rounds 15] [--steps 3]
"""

import argparse
import statistics
import time

import torch

import gradand
from gradand.backends import torch as gt

parser = argparse.ArgumentParser()
parser.add_argument("--rounds", type=int, default=15)
parser.add_argument("--steps", type=int, default=3, help="steps timed per round and strategy")
args = parser.parse_args()
torch.set_num_threads(1)
E, N, D, H = 16, 256, 2 + 4, 256
F = torch.nn.functional
x, y = torch.randn(E, N, D), torch.randint(0, 2, (E, N))
combiner = gradand.AndMask(threshold=0.8)
model = torch.nn.Sequential(
    torch.nn.Linear(D, H), torch.nn.ReLU(), torch.nn.Linear(H, H), torch.nn.ReLU(),
    torch.nn.Linear(H, H), torch.nn.ReLU(), torch.nn.Linear(H, 2),
)  # fmt: skip
opt = torch.optim.SGD(model.parameters(), lr=1e-3)


def plain():  # ordinary training: the mean loss over all environments, one backward
    F.cross_entropy(model(x.reshape(E * N, D)), y.reshape(E * N)).backward()


def streaming_separate_forwards():  # one forward + one backward per environment
    gt.backward([F.cross_entropy(model(x[e]), y[e]) for e in range(E)], model.parameters(), combiner)


def streaming_shared_forward():  # one forward over every environment, E backward passes through it
    out = model(x.reshape(E * N, D)).reshape(E, N, 2)
    gt.backward([F.cross_entropy(out[e], y[e]) for e in range(E)], model.parameters(), combiner)


def vectorised():
    gt.model_backward(model, F.cross_entropy, x, y, combiner, method="vectorized")


def vectorised_no_nan_check():  # nan_policy="propagate": no host sync per tensor
    gt.model_backward(model, F.cross_entropy, x, y, combiner, method="vectorized", nan_policy="propagate")


def vectorised_chunked():
    gt.model_backward(model, F.cross_entropy, x, y, combiner, method="vectorized", chunk_size=4)


def factored():  # one forward, one backward to the layers' outputs, per-environment Δ_eᵀ X_e
    gt.model_backward(model, F.cross_entropy, x, y, combiner)


strategies = {
    "plain averaging (loss.backward)": plain,
    "streaming gt.backward, separate forwards": streaming_separate_forwards,
    "streaming gt.backward, shared forward": streaming_shared_forward,
    'vectorised gt.model_backward(method="vectorized")': vectorised,
    "vectorised, nan_policy='propagate'": vectorised_no_nan_check,
    "vectorised, chunk_size=4": vectorised_chunked,
    "factored gt.model_backward": factored,
}


def one_step(fn):
    opt.zero_grad(set_to_none=True)
    fn()
    opt.step()


for fn in strategies.values():  # warm-up
    one_step(fn)
times = {name: [] for name in strategies}
for _ in range(args.rounds):
    for name, fn in strategies.items():
        t0 = time.perf_counter()
        for _ in range(args.steps):
            one_step(fn)
        times[name].append((time.perf_counter() - t0) / args.steps)
base = statistics.median(times["plain averaging (loss.backward)"])
print(f"torch {torch.__version__}, 1 thread, {E} envs x {N} examples, MLP {D}-{H}-{H}-{H}-2, {combiner!r}")
print(f"{'strategy':<44}{'median step':>12}{'ratio':>8}")
for name, ts in times.items():
    m = statistics.median(ts)
    print(f"{name:<44}{m * 1e3:>9.1f} ms{m / base:>8.2f}")
