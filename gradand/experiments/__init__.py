"""The paper's experiments, as functions the ``gradand`` command line and the tests call.

- :mod:`~gradand.experiments.patchwork` — the reference notebook's linear regression (numpy).
- :mod:`~gradand.experiments.landscapes` — the consistency-of-minima landscapes (numpy).
- :mod:`~gradand.experiments.spirals` — the synthetic spirals task: generator, presets, runner.
- :mod:`~gradand.experiments.memorization` — random labels, one environment per example.
- :mod:`~gradand.experiments.training` — the one training loop, and the protocols a backend implements.
- :mod:`~gradand.experiments.torch_training`, :mod:`~gradand.experiments.jax_training`,
  :mod:`~gradand.experiments.tf_training` — the backends: models and trainers in each framework
  (optional frameworks, imported only when used).

Importing this package imports numpy only.
"""

#: The registry of backends: name → the module whose ``BACKEND`` implements
#: :class:`gradand.experiments.training.Backend` (imported only when used).
TRAINING_MODULES = {
    "torch": "gradand.experiments.torch_training",
    "jax": "gradand.experiments.jax_training",
    "tensorflow": "gradand.experiments.tf_training",
}
