"""Per-example AND-mask with vmap: learn a rule, refuse to memorise random labels.

Every example is its own environment: ``gj.value_and_grad`` vmaps the loss of
ONE example over the batch and keeps only the gradient components on which a
fraction ``threshold`` of the examples agree in sign. A real rule gives many
examples a common direction; random labels give none, so averaging gradients
memorises them (train accuracy -> 1) while the AND-mask does not.

Run: python examples/jax_memorisation.py            (about half a minute on a CPU)
     python examples/jax_memorisation.py --quick    (a smoke test)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradand
from gradand.backends import jax as gj


def init_mlp(key: jax.Array, sizes: list[int]) -> list[dict]:
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def logits_fn(params: list[dict], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return (x @ params[-1]["w"] + params[-1]["b"])[..., 0]


def example_loss(params: list[dict], example: tuple[jax.Array, jax.Array]) -> jax.Array:
    """The loss of ONE example (no batch axis): value_and_grad vmaps it over the examples."""
    x, y = example
    return optax.sigmoid_binary_cross_entropy(logits_fn(params, x), y)


def is_info(x: object) -> bool:
    return isinstance(x, gradand.MaskInfo)


def make_step(combiner: gradand.Combiner, optimizer: optax.GradientTransformation):
    grad_fn = gj.value_and_grad(example_loss, combiner)

    @jax.jit
    def step(params, state, x, y):
        (_, result), grads = grad_fn(params, (x, y))  # x: (examples, features): one environment each
        updates, state = optimizer.update(grads, state, params)
        fractions = [info.survivor_fraction for info in jax.tree.leaves(result.infos, is_leaf=is_info)]
        return optax.apply_updates(params, updates), state, fractions

    return step


def fit(step, optimizer, x: jax.Array, y: jax.Array, args: argparse.Namespace) -> tuple[float, float]:
    params = init_mlp(jax.random.key(1), [x.shape[1], args.hidden, args.hidden, 1])
    state = optimizer.init(params)
    for _ in range(args.steps):
        params, state, kept = step(params, state, x, y)
    train_acc = float(jnp.mean((logits_fn(params, x) > 0) == (y > 0.5)))
    return train_acc, float(np.mean(jax.tree.leaves(kept)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.hidden, args.steps = 32, 16, 20

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.examples, args.features)).astype(np.float32)
    labels = {
        "real (a linear rule)": (x @ rng.standard_normal(args.features) > 0).astype(np.float32),
        "random": rng.integers(0, 2, args.examples).astype(np.float32),
    }
    print(f"{args.examples} examples, each its own environment; MLP 2x{args.hidden}; {args.steps} steps")
    print(f"{'labels':<22}{'combiner':<26}{'train acc':>10}{'kept':>8}")
    optimizer = optax.adam(args.lr)
    steps = {
        "Mean()": make_step(gradand.Mean(), optimizer),
        f"AndMask({args.threshold})": make_step(gradand.AndMask(threshold=args.threshold), optimizer),
    }
    for label_name, y in labels.items():
        for name, step in steps.items():
            acc, kept = fit(step, optimizer, jnp.asarray(x), jnp.asarray(y), args)
            print(f"{label_name:<22}{name:<26}{acc:>10.3f}{kept:>8.3f}")


if __name__ == "__main__":
    main()
