"""AND-masked data-parallel training with torch.distributed: each rank is one environment.

Run on CPU with two processes (gloo):

    torchrun --nproc_per_node=2 examples/torch_ddp.py

Part 1 wraps the model in DistributedDataParallel and registers gradand's
communication hook: instead of averaging the ranks' gradients, the hook
all-reduces the AND-mask's statistics (a SUM) and every rank finalizes the same
update. Part 2 gives each rank several environments: their statistics are
summed locally first (gt.backward(..., all_reduce=True)), then over the ranks.
"""

import math

import torch
import torch.distributed as dist

import gradand
from gradand.backends import torch as gt

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
F = torch.nn.functional


def environments(n_envs, n=128, shortcut_dims=4, seed=0):
    """Two spirals (the invariant mechanism) + a shortcut that points another way in each environment."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n_envs, n), generator=g)
    r = 0.08 + 0.92 * torch.rand(n_envs, n, generator=g)
    angle = 2 * math.pi * r + math.pi * y
    shortcut = torch.randn(n_envs, 1, shortcut_dims, generator=g) * (2 * y[..., None] - 1)
    return torch.cat([torch.stack([r * angle.cos(), r * angle.sin()], -1), shortcut], -1), y


def make_model():
    torch.manual_seed(0)  # the same initial parameters on every rank
    return torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))


def checksum(model):  # equal on every rank if the ranks applied the same updates
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, total)
    return [round(float(t), 10) for t in gathered]


combiner = gradand.AndMask(threshold=0.5)

# Part 1: DDP + communication hook, this rank's data is one environment.
x, y = environments(world)
model = make_model()
ddp = torch.nn.parallel.DistributedDataParallel(model)
hook = gt.register_comm_hook(ddp, combiner)
optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
for step in range(100):
    optimizer.zero_grad()
    loss = F.cross_entropy(ddp(x[rank]), y[rank])
    loss.backward()  # the hook all-reduces statistics, .grad = AND-masked update
    optimizer.step()
    if rank == 0 and step % 25 == 0:
        kept = [f"{float(i.survivor_fraction):.2f}" for i in hook.mask_infos(model.parameters())]
        print(f"[DDP hook] step {step:3d}  loss on rank 0 {loss.item():.3f}  survivors per tensor {kept}")
sums = checksum(model)
if rank == 0:
    print(f"[DDP hook] parameter checksums per rank: {sums}")
del ddp, optimizer  # destroy DDP while its process group is alive

# Part 2: several environments per rank, reduced locally, then all-reduced (no DDP averaging).
per_rank = 4
x, y = environments(world * per_rank, seed=1)
mine = range(rank * per_rank, (rank + 1) * per_rank)
model = make_model()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for step in range(100):
    optimizer.zero_grad()
    losses = [F.cross_entropy(model(x[e]), y[e]) for e in mine]
    gt.backward(losses, model.parameters(), combiner, all_reduce=True)
    optimizer.step()
    if rank == 0 and step % 25 == 0:
        print(f"[local envs] step {step:3d}  mean loss on rank 0 {torch.stack(losses).mean().item():.3f}")
sums = checksum(model)
if rank == 0:
    print(
        f"[local envs] {world * per_rank} environments on {world} ranks; parameter checksums per rank: {sums}"
    )
dist.destroy_process_group()
