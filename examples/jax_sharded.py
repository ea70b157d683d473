"""AND-masked training with the environments split over devices (shard_map + lax.psum).

Each device holds some of the environments, computes their gradients and the
core's additive statistics, and ``lax.psum`` sums the statistics over the
devices before the mask is taken: every device gets the update of ALL
environments, the same as one device seeing them all. On a CPU the devices
are forced host devices (``--xla_force_host_platform_device_count``).
This shows the mechanics; learning the spiral itself takes a wider MLP and
more steps (examples/jax_spirals.py).

Run: python examples/jax_sharded.py [--devices 4 --steps 100]
"""

from __future__ import annotations

import argparse
import os
import sys

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--devices", type=int, default=4)
parser.add_argument("--envs", type=int, default=16)
parser.add_argument("--examples", type=int, default=128)
parser.add_argument("--hidden", type=int, default=64)
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--threshold", type=float, default=0.8)
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()
if args.quick:
    args.envs, args.examples, args.hidden, args.steps = 8, 16, 16, 5

# Must be set before JAX initialises its CPU backend.
flag = f"--xla_force_host_platform_device_count={args.devices}"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax_spirals import env_loss, init_mlp, spirals

import gradand
from gradand.backends import jax as gj

assert args.envs % args.devices == 0, "--envs must be a multiple of --devices"
mesh = jax.make_mesh((args.devices,), ("envs",))
per_env = [spirals(args.examples, e, args.envs, 16, seed=e) for e in range(args.envs)]
x = np.stack([a for a, _ in per_env])
y = np.stack([b for _, b in per_env])
split = NamedSharding(mesh, P("envs"))  # environments split over the devices
batch = (jax.device_put(x, split), jax.device_put(y, split))

combiner = gradand.AndMask(threshold=args.threshold)
optimizer = optax.chain(optax.add_decayed_weights(1e-3), optax.adam(1e-2))
info_specs = gradand.Result(loss=P(), losses=P("envs"), infos=P(), summary=P(), aux=P())


def is_info(x: object) -> bool:
    return isinstance(x, gradand.MaskInfo)


def local_step(params, state, batch):
    """Runs on every device with its own environments; axis_name makes the mask global."""
    (loss, info), grads = gj.value_and_grad(env_loss, combiner, axis_name="envs")(params, batch)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, info


step = jax.jit(
    jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(P(), P(), P("envs")),
        out_specs=(P(), P(), P(), info_specs),
    )
)

params = init_mlp(jax.random.key(0), [x.shape[-1], args.hidden, args.hidden, args.hidden, 1])
state = optimizer.init(params)

# One device seeing all environments gives the same gradient.
(_, _), single = jax.jit(gj.value_and_grad(env_loss, combiner))(params, (jnp.asarray(x), jnp.asarray(y)))
(_, _), sharded = jax.jit(
    jax.shard_map(
        gj.value_and_grad(env_loss, combiner, axis_name="envs"),
        mesh=mesh,
        in_specs=(P(), P("envs")),
        out_specs=((P(), info_specs), P()),
    )
)(params, batch)
diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)))
print(f"{jax.device_count()} devices, {args.envs // args.devices} environments each")
print(f"first-step gradient, sharded vs one device: max |difference| = {diff:.2e}")

for i in range(1, args.steps + 1):
    params, state, loss, info = step(params, state, batch)
    if i % max(1, args.steps // 4) == 0 or i == args.steps:
        fractions = [i.survivor_fraction for i in jax.tree.leaves(info.infos, is_leaf=is_info)]
        kept = [round(float(f), 4) for f in fractions[1::2]]
        env_losses = np.round(np.asarray(info.losses)[:4], 3)
        print(f"step {i:4d}  mean loss {float(loss):.3f}  env losses {env_losses}...  kept (weights) {kept}")
