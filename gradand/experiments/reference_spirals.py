"""The spirals data of the reference experiment, drawn as the authors' public code draws it.

The reference is ``and_mask/run_synthetic.py`` with the generator it imports
(``and_mask/datasets/synthetic/synthetic_data_gen.py``) in the paper's repository,
https://github.com/gibipara92/learning-explanations-hard-to-vary (read at commit
``55c49f5``). This module re-implements that construction in numpy, draw for draw,
so the arrays are the reference's arrays (float32, same values):

- **One legacy generator per environment.** Training environment ``e`` draws everything
  from ``np.random.RandomState(seed + e)``; the test set from
  ``np.random.RandomState(2**32 - 1)`` (:data:`REFERENCE_TEST_SEED`), whatever the seed.
- **Draw order** inside one generator: a ``(n_envs, shortcut_dims)`` standard-normal
  matrix of shortcut vectors; radii ``U(0.08, 1)``; labels ``randint(0, 2)``, i.i.d.
  Bernoulli(1/2) (not balanced); radial noise ``U(-0.02, 0.02)`` added after the angle
  ``2π · revolutions · radius + π · label`` is fixed; for the test set only, then, the
  per-example shortcut features ``N(0, 1)``.
- **Shortcuts.** Environment ``e`` uses row ``e`` of the matrix its *own* generator drew,
  times ``2·label - 1``: perfectly and linearly predictive inside ``e``. The test set draws
  the matrix too (and discards it), then gives every example its own random shortcut
  features, so they say nothing about the label.
- **Normalisation.** The two spiral features of each environment, and of the test set, are
  divided by *that set's own* standard deviation per feature (``std(axis=0)``, ``ddof=0``);
  nothing is centred, and the shortcut features are not rescaled (they are already unit
  normal).

How it differs from gradand's own generator (:func:`gradand.experiments.spirals.make_spirals`):

- **Labels**: here i.i.d. Bernoulli(1/2), so an environment of 1024 examples holds
  about 47–53 % ones (seed 0: 481 to 535); ``make_spirals`` balances every environment and
  the test set exactly.
- **Spiral scale**: here each environment, and the test set, is divided by its own
  standard deviation; ``make_spirals`` divides everything by the pooled training standard
  deviation.
- **Test set**: here one fixed set (seed ``2**32 - 1``) for every seed, which depends only
  on ``n_envs``, ``shortcut_dims``, ``n_test``, ``revolutions`` and ``shortcut_scale``;
  ``make_spirals`` draws a new test set from each seed.
- **Seeding**: here environment ``e`` of seed ``s`` is ``RandomState(s + e)``, so seed
  ``s + 1``'s environment ``e`` has exactly the spirals and labels of seed ``s``'s
  environment ``e + 1`` (only its shortcut vector differs), and seeds 0, 1, 2 share 14 of
  their 16 environments' samples; ``make_spirals`` spawns independent streams from one
  ``default_rng(seed)``, so different seeds share nothing.
- **Shortcut vectors**: here row ``e`` of a matrix that environment ``e``'s own generator
  draws; ``make_spirals`` draws one matrix for all environments. Both are unit normal.
- **Radial noise and radii** are the same (``U(-0.02, 0.02)``, ``U(0.08, 1)``); the
  reference's are fixed, ``make_spirals``' ``noise`` is a parameter.

In the reference the seed changes only the data: ``run_synthetic.py`` calls
``torch.manual_seed(0)`` and ``np.random.seed(0)`` once, before anything else, whatever
``--seed`` is, so the initialisation (Kaiming-normal weights, biases 0.01), the
``DataLoader`` shuffles (``shuffle=True, drop_last=True``, batch 256 per environment) and
the order in which environments are grouped all come from :data:`REFERENCE_INIT_SEED`.
Two more facts for a faithful loop: a prediction is ``logit >= 0``, and the test set is
evaluated at the *start* of each epoch, before its training, so the reference's last
logged test accuracy is that after ``epochs - 1`` epochs.

``shortcut_scale`` is this module's one extension: it multiplies every shortcut feature,
training and test (1, the default, is the reference; other values serve sweeps).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # spirals.py imports this module for its ``reference`` preset
    from gradand.experiments.spirals import SpiralsData

__all__ = [
    "REFERENCE_INIT_SEED",
    "REFERENCE_LOOP_METHODS",
    "REFERENCE_TEST_SEED",
    "ReferenceSpiralsSetting",
    "make_reference_spirals",
    "train_reference_loop",
]

#: The reference's fixed seed of ``torch.manual_seed`` and ``np.random.seed``: the model's
#: initialisation, the data loaders' shuffles and the environments' grouping, whatever the
#: data seed.
REFERENCE_INIT_SEED: int = 0

#: The seed of the reference's one test set (the largest seed ``RandomState`` accepts).
REFERENCE_TEST_SEED: int = 2**32 - 1

_MAX_SEED = 2**32 - 1
_RADIUS_LOW, _RADIUS_HIGH, _RADIAL_NOISE = 0.08, 1.0, 0.02


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    bad = isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum
    if not bad and maximum is not None and value > maximum:
        bad = True
    if bad:
        expected = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {expected}; got {value!r}")
    return int(value)


def _check_positive(name: str, value: Any, *, allow_zero: bool) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {expected}; got {value!r}")
    return float(value)


def _draw_set(
    rng_seed: int, n: int, *, env: int | None, n_envs: int, shortcut_dims: int, revolutions: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One environment (``env``) or the test set (``env=None``), in the reference's draw order.

    Returns float64 inputs (n, 2 + d), labels (n,) and the shortcut vector used (d,)
    (zeros for the test set).
    """
    rng = np.random.RandomState(rng_seed)
    matrix = rng.randn(n_envs, shortcut_dims)
    radius = rng.uniform(_RADIUS_LOW, _RADIUS_HIGH, n)
    labels = rng.randint(0, 2, n)
    angle = 2.0 * revolutions * math.pi * radius + math.pi * labels
    radius = radius + rng.uniform(-_RADIAL_NOISE, _RADIAL_NOISE, n)
    spiral = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    spiral /= spiral.std(axis=0)
    if env is None:
        shortcut_vector = np.zeros(shortcut_dims)
        shortcut = rng.randn(n, shortcut_dims)
    else:
        shortcut_vector = matrix[env]
        shortcut = (2.0 * labels - 1.0)[:, None] * shortcut_vector[None, :]
    return np.hstack([spiral, shortcut]), labels.astype(np.float64), shortcut_vector


def make_reference_spirals(
    *,
    n_envs: int = 16,
    examples_per_env: int = 1024,
    n_test: int = 2000,
    shortcut_dims: int = 8,
    shortcut_scale: float = 1.0,
    revolutions: float = 3.0,
    seed: int = 0,
) -> SpiralsData:
    """The reference experiment's training environments and its fixed test set.

    The defaults are ``run_synthetic.py``'s (16 environments of 1024 examples, 2000
    test examples, 8 shortcut dimensions, 3 revolutions, seed 0). See the module
    docstring for the construction and how it differs from
    :func:`~gradand.experiments.spirals.make_spirals`.

    Args:
        n_envs: number of training environments (≥ 1).
        examples_per_env: examples per environment (≥ 2: each environment is scaled by
            its own standard deviation).
        n_test: test examples (≥ 2).
        shortcut_dims: shortcut dimensions d (≥ 0).
        shortcut_scale: factor on every shortcut feature (≥ 0; 1 is the reference).
        revolutions: turns of each spiral (> 0; the reference's is an integer, 3).
        seed: the data seed; environment ``e`` is drawn from ``RandomState(seed + e)``, so
            ``seed + n_envs - 1`` must be at most ``2**32 - 1``. It does not change the
            test set.

    Returns:
        :class:`~gradand.experiments.spirals.SpiralsData` (float32); ``shortcuts[e]`` is
        environment ``e``'s shortcut vector (times ``shortcut_scale``).

    Example:
        >>> import numpy as np
        >>> from gradand.experiments.reference_spirals import make_reference_spirals
        >>> a = make_reference_spirals(n_envs=4, examples_per_env=64, n_test=50, seed=0)
        >>> a.train_x.shape, a.train_y.shape, a.test_x.shape, a.shortcuts.shape
        ((4, 64, 10), (4, 64), (50, 10), (4, 8))
        >>> b = make_reference_spirals(n_envs=4, examples_per_env=64, n_test=50, seed=1)
        >>> bool(np.array_equal(a.test_x, b.test_x))  # one test set for every seed
        True
        >>> # seed 1's environment 0 has the spirals of seed 0's environment 1
        >>> bool(np.array_equal(a.train_x[1, :, :2], b.train_x[0, :, :2]))
        True
    """
    n_envs = _check_int("n_envs", n_envs, 1)
    examples_per_env = _check_int("examples_per_env", examples_per_env, 2)
    n_test = _check_int("n_test", n_test, 2)
    shortcut_dims = _check_int("shortcut_dims", shortcut_dims, 0)
    shortcut_scale = _check_positive("shortcut_scale", shortcut_scale, allow_zero=True)
    revolutions = _check_positive("revolutions", revolutions, allow_zero=False)
    try:
        seed = _check_int("seed", seed, 0, _MAX_SEED - (n_envs - 1))
    except ValueError as error:
        raise ValueError(
            f"{error} (environment e draws from RandomState(seed + e), which takes seeds up to 2**32 - 1)"
        ) from None

    from gradand.experiments.spirals import SpiralsData

    common = {"n_envs": n_envs, "shortcut_dims": shortcut_dims, "revolutions": revolutions}
    envs = [_draw_set(seed + e, examples_per_env, env=e, **common) for e in range(n_envs)]
    test_x, test_y, _ = _draw_set(REFERENCE_TEST_SEED, n_test, env=None, **common)
    train_x = np.stack([x for x, _, _ in envs])
    train_y = np.stack([y for _, y, _ in envs])
    shortcuts = np.stack([s for _, _, s in envs]) * shortcut_scale
    if shortcut_scale != 1.0:
        train_x[:, :, 2:] *= shortcut_scale
        test_x[:, 2:] *= shortcut_scale

    f32 = np.float32
    return SpiralsData(
        train_x.astype(f32),
        train_y.astype(f32),
        test_x.astype(f32),
        test_y.astype(f32),
        shortcuts.reshape(n_envs, shortcut_dims).astype(f32),
    )


@dataclasses.dataclass(frozen=True)
class ReferenceSpiralsSetting:
    """Parameters of :func:`make_reference_spirals` (the data side of the ``reference`` preset).

    The training side that goes with it is the reference's fixed
    :data:`REFERENCE_INIT_SEED` for initialisation and shuffling. Invalid values fail
    here, on construction.

    Example:
        >>> from gradand.experiments.reference_spirals import ReferenceSpiralsSetting
        >>> ReferenceSpiralsSetting(n_envs=2, examples_per_env=4, n_test=4).make(0).train_x.shape
        (2, 4, 10)
        >>> ReferenceSpiralsSetting(n_envs=0)
        Traceback (most recent call last):
        ...
        ValueError: n_envs must be an integer >= 1; got 0
    """

    n_envs: int = 16
    examples_per_env: int = 1024
    n_test: int = 2000
    shortcut_dims: int = 8
    shortcut_scale: float = 1.0
    revolutions: float = 3.0

    def __post_init__(self) -> None:
        _check_int("n_envs", self.n_envs, 1)
        _check_int("examples_per_env", self.examples_per_env, 2)
        _check_int("n_test", self.n_test, 2)
        _check_int("shortcut_dims", self.shortcut_dims, 0)
        _check_positive("shortcut_scale", self.shortcut_scale, allow_zero=True)
        _check_positive("revolutions", self.revolutions, allow_zero=False)

    def make(self, seed: int) -> SpiralsData:
        """The data for one seed (the test set is the same for every seed).

        Example:
            >>> from gradand.experiments.reference_spirals import ReferenceSpiralsSetting
            >>> data = ReferenceSpiralsSetting(n_envs=3, examples_per_env=8, n_test=6).make(5)
            >>> data.train_y.shape, str(data.train_y.dtype)
            ((3, 8), 'float32')
        """
        return make_reference_spirals(**dataclasses.asdict(self), seed=seed)


#: The methods :func:`train_reference_loop` knows: the reference's ``and_mask`` and
#: ``geom_mean``, and plain averaging, which the reference runs as ``and_mask`` with τ = 0.
REFERENCE_LOOP_METHODS: tuple[str, ...] = ("mean", "and_mask", "geometric_mean")

#: :func:`train_reference_loop` without batch norm: per-environment gradients from one
#: backward pass (``False``: one ``autograd.grad`` per environment, as the reference; slower).
_FACTORED_GRADIENTS = True


def _reference_update(grads: Any, method: str, threshold: float) -> tuple[Any, Any]:
    """The reference's combination of one tensor's per-environment gradients (E, ...).

    The mask is ``|mean_e sign(g_e)| >= τ``; the AND-mask keeps ``mean_e g_e`` there, the
    geometric mean ``sign(mean_e g_e) · exp(mean_e log(|g_e| + 1e-10))``, and both are
    multiplied by ``1 / (1e-10 + kept fraction)`` (``scale_grad_inverse_sparsity=1``). Plain
    averaging is the AND-mask at τ = 0 (every component kept, the factor exactly 1 in float32).
    """
    import torch

    mask = (torch.sign(grads).mean(dim=0).abs() >= threshold).to(torch.float32)
    kept = mask.sum() / mask.numel()
    average = grads.mean(dim=0)
    if method == "geometric_mean":
        update = torch.sign(average) * torch.exp(torch.log(grads.abs() + 1e-10).sum(dim=0) / grads.shape[0])
    else:
        update = average
    return mask * update * (1.0 / (1e-10 + kept)), mask.sum()


def train_reference_loop(
    data: SpiralsData,
    *,
    method: str,
    threshold: float = 1.0,
    epochs: int = 150,
    batch_size: int = 256,
    lr: float = 1e-2,
    weight_decay: float = 1e-3,
    l1: float = 0.0,
    dropout: float = 0.0,
    batch_norm: bool = False,
    hidden_units: int = 256,
    hidden_layers: int = 3,
    seed: int = REFERENCE_INIT_SEED,
    test_batch_size: int = 1000,
    show_progress: bool = False,
    desc: str = "",
) -> dict[str, Any]:
    """Train the spirals MLP with the reference's own loop, re-implemented here (PyTorch, CPU).

    This is ``run_synthetic.py``'s training loop written anew, operation for operation, so
    that gradand's loop (:func:`gradand.experiments.training.fit`) can be compared with it
    where the two differ: ``torch.manual_seed(seed)`` and ``np.random.seed(seed)`` once, then
    the MLP (Linear layers with PyTorch's default initialisation, then Kaiming-normal weights
    and biases 0.01, in module order); one ``DataLoader(shuffle=True, drop_last=True)`` per
    environment and one for the test set (batches of ``test_batch_size``), so the shuffles
    draw from PyTorch's global generator in the reference's order; every step a fresh
    ``np.random.permutation`` of the environments (the reference's ``permutation_groups``
    with all environments in one group) and the next batch of each environment, concatenated;
    one forward pass, one ``autograd.grad`` per environment of its mean binary cross-entropy,
    the reference's mask and rescaling (:func:`_reference_update`); ``l1 · sign(θ)`` added;
    ``torch.optim.Adam`` with ``weight_decay`` (L2 added to the combined gradient);
    learning rate × 0.1 after ``3 · epochs // 4`` epochs (``MultiStepLR``). The test set is
    evaluated at the *start* of every epoch (prediction ``logit >= 0``), so the last value
    the reference logs is that after ``epochs - 1`` epochs. The reference code itself is
    not run (it is not a dependency of gradand).

    It changes PyTorch's and numpy's global random state, as the reference script does.

    Args:
        data: the training environments and test set (e.g. ``ReferenceSpiralsSetting().make(s)``).
        method: one of :data:`REFERENCE_LOOP_METHODS` (``mean`` is the reference's
            ``and_mask`` at τ = 0).
        threshold: τ of ``and_mask`` and ``geometric_mean``.
        epochs, batch_size, lr, weight_decay, l1, dropout, batch_norm, hidden_units,
            hidden_layers: ``run_synthetic.py``'s arguments of those names.
        seed: the seed of both global generators (the reference's is always 0).
        test_batch_size: the test loader's batch size (1000 in the reference; with
            ``drop_last`` a remainder of the test set is not evaluated, as there).
        show_progress, desc: a progress bar over steps and its label.

    Returns:
        ``{"final": {"train", "test", "test_no_shortcuts"}`` after ``epochs - 1`` epochs (what
        the reference reports), ``"at_end"``: the same after the last epoch, ``"curve"``:
        ``{"epoch": [0, ..., epochs - 1], "test": [...]}`` (epochs completed at each
        evaluation), ``"survivor_fraction"``, ``"steps"``, ``"seconds"}``. ``train`` is the
        accuracy on every training example in evaluation mode (the reference logs a running
        accuracy during training instead); ``test_no_shortcuts`` the test accuracy with the
        shortcut features set to 0.

    Example:
        >>> from gradand.experiments.reference_spirals import ReferenceSpiralsSetting, train_reference_loop
        >>> data = ReferenceSpiralsSetting(n_envs=4, examples_per_env=32, n_test=40).make(0)
        >>> out = train_reference_loop(data, method="and_mask", epochs=2, batch_size=16, hidden_units=8,
        ...                            test_batch_size=20)
        >>> out["curve"]["epoch"], out["steps"], sorted(out["final"])
        ([0, 1], 4, ['test', 'test_no_shortcuts', 'train'])
    """
    import torch

    from gradand.experiments._report import progress

    if method not in REFERENCE_LOOP_METHODS:
        raise ValueError(f"method must be one of {list(REFERENCE_LOOP_METHODS)}; got {method!r}")
    epochs = _check_int("epochs", epochs, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    test_batch_size = _check_int("test_batch_size", test_batch_size, 1)
    hidden_layers = _check_int("hidden_layers", hidden_layers, 1)
    hidden_units = _check_int("hidden_units", hidden_units, 1)
    seed = _check_int("seed", seed, 0, _MAX_SEED)
    threshold = 0.0 if method == "mean" else float(threshold)
    n_envs, n_per_env, features = data.train_x.shape
    if batch_size > n_per_env:
        raise ValueError(
            f"batch_size must be at most the {n_per_env} examples per environment; got {batch_size}"
        )
    if test_batch_size > len(data.test_y):
        raise ValueError(
            f"test_batch_size must be at most the {len(data.test_y)} test examples; got {test_batch_size}"
        )

    torch.manual_seed(seed)
    np.random.seed(seed)
    nn = torch.nn
    loader = torch.utils.data.DataLoader
    dataset = torch.utils.data.TensorDataset
    train_loaders = [
        loader(dataset(torch.tensor(data.train_x[e]), torch.tensor(data.train_y[e])),
               batch_size=batch_size, shuffle=True, drop_last=True)
        for e in range(n_envs)
    ]  # fmt: skip
    test_loader = loader(
        dataset(torch.tensor(data.test_x), torch.tensor(data.test_y)),
        batch_size=test_batch_size, shuffle=True, drop_last=True,
    )  # fmt: skip
    linears = [nn.Linear(features, hidden_units)]
    linears += [nn.Linear(hidden_units, hidden_units) for _ in range(hidden_layers - 1)]
    output_layer = nn.Linear(hidden_units, 1)
    layers: list[Any] = []
    for linear in linears:
        layers += [linear] + ([nn.BatchNorm1d(hidden_units)] if batch_norm else []) + [nn.LeakyReLU()]
        layers += [nn.Dropout(p=dropout)] if dropout > 0 else []
    model = nn.Sequential(*layers, output_layer)
    for module in model.modules():
        if type(module) is nn.Linear:
            nn.init.kaiming_normal_(module.weight)
            module.bias.data.fill_(0.01)
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3 * epochs // 4], gamma=0.1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    train_x, train_y = torch.tensor(data.train_x.reshape(-1, features)), data.train_y.reshape(-1)
    test_x = torch.tensor(data.test_x)
    zeroed = test_x.clone()
    zeroed[:, 2:] = 0

    def accuracy(x: Any, y: np.ndarray) -> float:  # no generator is touched here
        model.eval()
        with torch.no_grad():
            pred = (model(x).squeeze(1) >= 0).numpy()
        return float(np.mean(pred == (y == 1)))

    def reference_test() -> float:  # the reference's run_test: the shuffled loader, logit >= 0
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for xb, yb in test_loader:
                correct += int(((model(xb).squeeze(1) >= 0) == yb.bool()).sum())
                total += len(yb)
        return correct / total

    def extras(test: float) -> dict[str, float]:
        return {"train": accuracy(train_x, train_y), "test": test,
                "test_no_shortcuts": accuracy(zeroed, data.test_y)}  # fmt: skip

    # Each environment's gradient, as the reference's one autograd.grad per environment computes
    # it. Without batch norm an example's loss depends on its own input only, so one backward
    # pass of the summed losses gives every Linear layer's per-example output gradients δ, and
    # environment e's gradients are Σ_{i in e} δ_i x_iᵀ and Σ_{i in e} δ_i (the same sums,
    # computed faster); with batch norm, one autograd.grad per environment.
    linear_layers = [m for m in model.modules() if type(m) is nn.Linear]
    layer_inputs: dict[Any, Any] = {}
    factored = not batch_norm and _FACTORED_GRADIENTS
    if factored:
        for layer in linear_layers:
            layer.register_forward_hook(lambda m, args, out: layer_inputs.__setitem__(m, (args[0], out)))

    def per_env_gradients(losses: list[Any]) -> list[Any]:
        if not factored:
            grads = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
            return [torch.stack([g[i] for g in grads]) for i in range(len(params))]
        outs = [layer_inputs[m][1] for m in linear_layers]
        deltas = torch.autograd.grad(torch.stack(losses).sum(), outs)
        by_param = {}
        for layer, delta in zip(linear_layers, deltas):
            x = layer_inputs[layer][0].reshape(n_envs, batch_size, -1)
            d = delta.reshape(n_envs, batch_size, -1)
            by_param[layer.weight] = torch.bmm(d.transpose(1, 2), x)
            by_param[layer.bias] = d.sum(dim=1)
        return [by_param[p] for p in params]

    steps_per_epoch = n_per_env // batch_size
    total = epochs * steps_per_epoch
    bar = progress(range(total), total=total, desc=desc, enabled=show_progress)
    ticks = iter(bar)
    curve: dict[str, list[Any]] = {"epoch": [], "test": []}
    kept: list[float] = []
    n_params = sum(p.numel() for p in params)
    final: dict[str, float] = {}
    start = time.perf_counter()
    for epoch in range(epochs):
        test = reference_test()
        curve["epoch"].append(epoch)
        curve["test"].append(test)
        if epoch == epochs - 1:
            final = extras(test)
        model.train()
        iterators = [iter(dl) for dl in train_loaders]
        while True:
            order = np.random.permutation(n_envs)
            try:
                batches = [next(iterators[e]) for e in order]
            except StopIteration:
                break
            next(ticks, None)
            inputs = torch.cat([b[0] for b in batches])
            targets = torch.cat([b[1] for b in batches])
            optimizer.zero_grad()
            outputs = model(inputs).squeeze(1).view(n_envs, batch_size)
            targets = targets.view(n_envs, batch_size)
            losses = [bce(outputs[e], targets[e]) for e in range(n_envs)]
            per_env = per_env_gradients(losses)
            survivors = 0.0
            for p, grads in zip(params, per_env):
                p.grad, count = _reference_update(grads, method, threshold)
                survivors += float(count)
                if l1 > 0:
                    p.grad.add_(torch.sign(p.data), alpha=l1)
            kept.append(survivors / n_params)
            optimizer.step()
        scheduler.step()
    at_end = extras(reference_test())
    if hasattr(bar, "close"):
        bar.close()
    return {
        "final": final,
        "at_end": at_end,
        "curve": curve,
        "survivor_fraction": float(np.mean(kept)) if kept else 1.0,
        "steps": total,
        "seconds": time.perf_counter() - start,
    }
