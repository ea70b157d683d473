"""Mixed precision with the AND-mask: torch.autocast + torch.amp.GradScaler.

The losses are scaled by the GradScaler as usual; gt.backward(..., loss_scale=scaler)
unscales each environment's gradient (in float32) *before* combining them, because
some combiners are not scale-equivariant (SandMask's variance scales with the
square of the loss scale), then writes the scaled update into .grad so that
scaler.step(optimizer) and scaler.update() work unchanged: an overflow in any
environment makes the step skipped and the scale lowered.

Runs float16 on a CUDA GPU, bfloat16 on the CPU. Run: python examples/torch_amp.py
"""

import torch

import gradand
from gradand.backends import torch as gt

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.bfloat16
torch.set_num_threads(1)
F = torch.nn.functional
g = torch.Generator().manual_seed(0)
n_envs, n, d = 8, 64, 10
w_true = torch.randn(d, generator=g)
x = torch.randn(n_envs, n, d, generator=g)
y = (x @ w_true > 0).long()
x, y = x.to(device), y.to(device)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)).to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
combiner = gradand.SandMask(threshold=0.5, k=10.0)
for step in range(150):
    optimizer.zero_grad()
    with torch.autocast(device, dtype=dtype):
        losses = torch.stack([F.cross_entropy(model(x[e]), y[e]) for e in range(n_envs)])
    result = gt.backward(scaler.scale(losses), model.parameters(), combiner, loss_scale=scaler)
    scaler.step(optimizer)
    scaler.update()
    if step % 50 == 0 or step == 149:
        kept = float(result.summary.survivor_fraction)
        loss = losses.float().mean().item()
        print(f"step {step:3d}  loss {loss:.3f}  mask mean {kept:.2f}  scale {scaler.get_scale():g}")
with torch.no_grad(), torch.autocast(device, dtype=dtype):
    accuracy = (model(x).argmax(-1) == y).float().mean().item()
print(f"{device} autocast {dtype}: training accuracy {accuracy:.3f}")
