"""Patchwork vs invariance on the reference notebook's linear regression (numpy only).

Run: python examples/numpy_patchwork.py
"""

from gradand.experiments.patchwork import default_combiners, train

print(f"{'method':<16}{'trained on':<12}{'weights':<44}{'held-out loss':>14}")
for envs in [(0, 1, 2, 3), (0, 1)]:
    for name, combiner in default_combiners().items():
        result = train(combiner, environments=envs)
        weights = "[" + ", ".join(f"{w:5.2f}" for w in result.weights) + "]"
        held = "-" if len(envs) == 4 else f"{result.heldout_loss:.3f}"
        print(f"{name:<16}{str(len(envs)) + ' envs':<12}{weights:<44}{held:>14}")
