"""The factored source: per-environment gradients of linear and conv layers from one backward pass.

A linear layer's weight gradient is a sum of outer products, ``Σ_b δ_b x_bᵀ``
(``x_b`` the layer's input, ``δ_b = ∂loss/∂y_b`` the gradient at its output).
Examples do not interact, so for ``total = Σ_e loss_e`` the output gradient of
an example of environment ``e`` is ``∂loss_e/∂y``, and environment ``e``'s
weight gradient is ``Δ_eᵀ X_e``. One forward pass over every example and one
``torch.autograd.grad`` with respect to the layers' *outputs* (autograd then
skips the weight-gradient matrix products) give every ``Δ``; one batched
``(X, Δ)`` pair per layer call goes to the core's factored engine
(:func:`gradand.layer_statistics`: batched products per chunk, the
outer-product path for one example per environment, the NaN check). This
module only finds the layers and records ``X`` and ``Δ``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.func import vmap

import gradand
from gradand._namespace import apply_nan_policy
from gradand.backends.torch._batchnorm import per_environment_batch_norm, plain_batch_norms
from gradand.backends.torch._common import (
    XP,
    check_chunk_size,
    check_combiner,
    check_model,
    check_policy,
    deprecated,
    loss_scale_of,
    trainable,
    unscale,
    with_context,
)
from gradand.backends.torch._vectorized import _chunks, environment_batches

__all__ = ["FACTORED_LAYERS", "factored_statistics"]

LossFn = Callable[[Any, Any], torch.Tensor]
F = torch.nn.functional

#: Layer types whose parameters the factored strategy handles without
#: per-environment backward passes (exact types or subclasses that keep the
#: base ``forward``). Every other parameter falls back (``fallback=``).
FACTORED_LAYERS: tuple[type[torch.nn.Module], ...] = (
    torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
)  # fmt: skip

_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_BN = torch.nn.modules.batchnorm._BatchNorm


def _supported(m: torch.nn.Module) -> bool:
    if isinstance(m, _BN):
        return type(m).forward is _BN.forward and not isinstance(m, torch.nn.SyncBatchNorm)
    if isinstance(m, torch.nn.Linear):
        return type(m).forward is torch.nn.Linear.forward
    for conv in _CONVS:
        if isinstance(m, conv):
            return (
                type(m).forward is conv.forward
                and m.padding_mode == "zeros"
                and not isinstance(m.padding, str)
            )
    return False


def _spatial_dims(m: torch.nn.Module) -> int:
    """A convolution's number of spatial dimensions (0 for a linear layer)."""
    return next((k + 1 for k, conv in enumerate(_CONVS) if isinstance(m, conv)), 0)


class _Call:
    """One call of a supported layer: its input (detached) and output (in the graph).

    ``x_node`` is the autograd node of the layer's input (None when it needs no
    gradient): the graph outside the call continues there. ``y_node`` is the
    node of the layer's final output, where a walk over the graph steps over the
    call. A BatchNorm call records ``x̂`` as ``x`` and ``t = x̂ ⊙ γ`` as ``y``
    (see ``_batchnorm``); its ``source`` is the layer's input and ``out`` its output.
    """

    __slots__ = ("module", "x", "x_node", "x_version", "y", "y_node", "y_version")

    def __init__(
        self,
        module: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        source: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> None:
        self.module, self.x, self.y = module, x.detach(), y
        self.x_version, self.y_version = x._version, y._version
        src = x if source is None else source
        self.x_node = (
            src.grad_fn
            if src.grad_fn is not None or not src.requires_grad
            else torch.autograd.graph.get_gradient_edge(src).node
        )
        self.y_node = (y if out is None else out).grad_fn

    def modified(self) -> bool:
        return self.x._version != self.x_version or self.y._version != self.y_version


def _per_env(t: torch.Tensor, n_env: int, pad: torch.Tensor | None) -> torch.Tensor:
    """``(B, ...)`` -> ``(E, n, ...)``; ``pad`` gathers each environment's examples.

    ``pad`` is ``(E, n_max)``, index ``B`` standing for a zero example (environments
    of different sizes padded to the largest: zero examples add nothing to a gradient).
    """
    if pad is None:
        return t.reshape(n_env, -1, *t.shape[1:])
    t = torch.cat([t, t.new_zeros(1, *t.shape[1:])])
    return t[pad]


#: Examples per environment below which a chunk's convolution weight gradients are one grouped
#: convolution (environments as groups), and from which one convolution per environment: on this
#: CPU (1 thread) the grouped one is 1.5-3x faster at 1-2 examples, the loop 1.2-5x faster from 8.
_GROUPED_BELOW = 4


def _conv_gradient(m: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-environment weight gradients of convolution ``m``: ``(e, n, C, *S), (e, n, O, *S') -> (e, *W)``.

    PyTorch's own weight-gradient kernel (``aten.convolution_backward``, what
    autograd runs for the layer), per environment or as one grouped convolution;
    no im2col patches.
    """
    shape = tuple(m.weight.shape)

    def weight_grad(x: torch.Tensor, d: torch.Tensor, groups: int) -> torch.Tensor:
        size = (shape[0] * groups // m.groups, *shape[1:])
        placeholder = d.new_empty(1).expand(size)
        return torch.ops.aten.convolution_backward(
            d, x, placeholder, None, m.stride, m.padding, m.dilation, False,
            [0] * len(m.stride), groups, (False, True, False),
        )[1]  # fmt: skip

    def gradient(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        e, n = x.shape[:2]
        if n >= _GROUPED_BELOW or e == 1:
            return torch.stack([weight_grad(x[i], d[i], m.groups) for i in range(e)])
        # environments as groups: (n, e·C, ...) and (n, e·O, ...), weight (e·O, C/groups, ...)
        xg = x.transpose(0, 1).reshape(n, -1, *x.shape[3:])
        dg = d.transpose(0, 1).reshape(n, -1, *d.shape[3:])
        return weight_grad(xg, dg, e * m.groups).reshape(e, *shape)

    return gradient


def _scale_gradient(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-environment gradients of a per-channel scale: ``(e, n, C, *S), (e, n, C, *S) -> (e, C)``."""
    prod = x * d
    return prod.sum(dim=(1, *range(3, prod.ndim)))


def _layer_factors(call: _Call, delta: torch.Tensor, n_env: int, pad: torch.Tensor | None, kind: str) -> Any:
    """The core's :class:`gradand.LayerFactors` of one call: ``X`` and ``Δ`` (and a conv's gradient op)."""
    m = call.module
    if isinstance(m, torch.nn.Linear):
        b = call.x.shape[0]
        x, d = call.x.reshape(b, -1, m.in_features), delta.reshape(b, -1, m.out_features)
        inputs = None if kind == "bias" else _per_env(x, n_env, pad).flatten(1, 2)
        return gradand.LayerFactors(inputs, _per_env(d, n_env, pad).flatten(1, 2))
    if kind == "bias":  # Σ over examples and positions of δ: each example's sum over its positions
        # (what autograd sums for one example), then the core's sum over the environment's examples;
        # rows = examples x positions would copy the (B, C, positions) gradient into (B, positions, C)
        d = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(-1)
        return gradand.LayerFactors(None, _per_env(d, n_env, pad))
    # γ: Σ over examples and positions of δ ⊙ x̂ per channel; a convolution's weight: the raw
    # inputs per environment and PyTorch's weight-gradient op
    gradient = _scale_gradient if isinstance(m, _BN) else _conv_gradient(m)
    return gradand.LayerFactors(_per_env(call.x, n_env, pad), _per_env(delta, n_env, pad), gradient)


def _padding(groups: list[Any], n_env: int, batch: int, device: torch.device) -> torch.Tensor | None:
    """``(E, n_max)`` example indices per environment, ``batch`` (a zero row) after its last example."""
    if groups[0][1] is None:
        return None
    n_max = max(idx.shape[1] for _, idx in groups)
    pad = torch.full((n_env, n_max), batch, dtype=torch.long, device=device)
    for envs, idx in groups:
        pad[envs, : idx.shape[1]] = idx
    return pad


def factored_statistics(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    combiner: gradand.Combiner,
    *,
    env_ids: torch.Tensor | None = None,
    num_envs: int | None = None,
    chunk_size: int | None = None,
    fallback: str = "vectorized",
    nan_policy: str = "raise",
    loss_scale: Any = None,
) -> tuple[torch.Tensor, list[gradand.Statistics]]:
    """Source: per-environment statistics from one forward and one backward pass (the factored fast path).

    1. One forward pass over every example, with forward hooks on the
       supported layers (:data:`FACTORED_LAYERS`: ``nn.Linear`` on inputs
       ``(B, ..., in)``; ``nn.Conv1d``/``Conv2d``/``Conv3d`` with any
       ``groups``, zero padding given as numbers) that record each call's
       input ``X`` and output ``y``;
    2. the per-environment losses and one ``torch.autograd.grad(Σ_e loss_e,
       [y, ...])``: the gradients ``Δ`` at the layers' outputs, without the
       weight-gradient products;
    3. per parameter, one :class:`gradand.LayerFactors` per call of its layer
       (``X`` as ``(E, rows, in)`` and ``Δ`` as ``(E, rows, out)``; for a
       convolution's weight the raw inputs and output gradients per
       environment with PyTorch's own weight-gradient kernel, no im2col
       patches; with ``env_ids``, each environment padded to the largest with
       zero examples) handed to :func:`gradand.layer_statistics`.

    ``nn.BatchNorm1d/2d/3d`` layers normalise each environment with its own
    batch statistics in train mode, as one forward pass per environment would
    (their running statistics updated once per environment, in order; see
    ``_batchnorm``), and their ``γ``, ``β`` are factored too. Other examples
    must not interact in the forward pass (another BatchNorm type in train
    mode, e.g. ``SyncBatchNorm``, raises ``ValueError``). Parameters of a supported layer
    that is never called, called on inputs that are not batch-first, shared
    with an unsupported module, or also used outside the layer's calls (tied
    weights read directly, ``F.linear(x, self.lin.weight.t())``, a loss term;
    found by a walk over the autograd graph) are not factored; nor is any
    other parameter (LayerNorm, embeddings, ...). With
    ``fallback="vectorized"`` their per-environment gradients come from one
    batched backward pass through the same graph
    (``torch.autograd.grad(..., is_grads_batched=True)``: the same dropout
    masks); with ``fallback="error"`` a ``ValueError`` lists them.

    Args:
        model, loss_fn, inputs, targets, env_ids, num_envs: as in
            :func:`vectorized_statistics`; ``loss_fn`` is called under
            ``torch.func.vmap`` over environments when it can be.
        combiner: the combiner whose statistics to compute.
        chunk_size: environments per batched product; ``None`` picks, on CPU,
            about 2 MiB of gradients per layer (all at once on other devices
            and for one example per environment).
        fallback: ``"vectorized"`` or ``"error"`` (``"batched"`` is the
            deprecated name of ``"vectorized"``).
        nan_policy: ``"raise"``, ``"zero"`` or ``"propagate"``; ``"raise"``
            is checked on the summed statistics.
        loss_scale: a number or a ``torch.amp.GradScaler``, as in
            :func:`vectorized_statistics`.

    Returns:
        ``(losses, stats)``: the detached per-environment losses ``(E,)`` and
        one :class:`gradand.Statistics` per parameter that requires grad, in
        ``model.parameters()`` order.

    Example:
        >>> import torch, gradand
        >>> from gradand.backends import torch as gt
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(5, 8, 3), torch.randint(0, 2, (5, 8))  # 5 environments of 8 examples
        >>> ce = torch.nn.functional.cross_entropy
        >>> losses, stats = gt.factored_statistics(model, ce, x, y, gradand.AndMask(threshold=0.8))
        >>> losses.shape, [s.count for s in stats]
        (torch.Size([5]), [5, 5, 5, 5])
    """
    check_model(model, loss_fn, inputs, targets)
    check_combiner(combiner)
    check_policy(nan_policy)
    if fallback == "batched":
        deprecated("fallback='batched'", "fallback='vectorized'", 4)
        fallback = "vectorized"
    if fallback not in ("vectorized", "error"):
        raise ValueError(f"fallback must be 'vectorized' or 'error'; got {fallback!r}")
    check_chunk_size(chunk_size)
    n_env, groups = environment_batches(inputs, targets, env_ids, num_envs)
    norms = plain_batch_norms(model)
    _check_other_batch_norms(model, norms)
    named = trainable(model)
    names = {id(p): n for n, p in named}

    # Which module(s) own each trainable parameter.
    owners: dict[int, list[torch.nn.Module]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(m)
    hooked = {id(m): m for ms in owners.values() for m in ms if _supported(m) and not isinstance(m, _BN)}

    flat = inputs if env_ids is not None else inputs.reshape(-1, *inputs.shape[2:])
    batch = flat.shape[0]
    calls: list[_Call] = []
    bad: set[int] = set()  # supported modules called in a way we cannot factor

    def hook(m: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
        x = args[0] if args else None
        ok = (
            isinstance(x, torch.Tensor)
            and isinstance(out, torch.Tensor)
            and x.ndim >= 2
            and x.shape[0] == batch
            and out.shape[0] == batch
            and out.requires_grad
            and (x.ndim == _spatial_dims(m) + 2 or isinstance(m, torch.nn.Linear))
        )
        if ok:
            calls.append(_Call(m, x, out))
        else:
            bad.add(id(m))

    scale = loss_scale_of(loss_scale)
    policy = "propagate" if scale is not None and nan_policy == "raise" else nan_policy

    def record(m: torch.nn.Module, xhat: torch.Tensor, t: torch.Tensor, x: Any, y: torch.Tensor) -> None:
        if t.requires_grad:
            calls.append(_Call(m, xhat, t, source=x, out=y))
        else:
            bad.add(id(m))

    if env_ids is None:
        env = torch.arange(n_env, device=flat.device).repeat_interleave(inputs.shape[1])
    else:
        env = env_ids.to(flat.device).long()
    handles = [m.register_forward_hook(hook) for m in hooked.values()]
    try:
        with per_environment_batch_norm(norms, env, n_env, record) if norms else contextlib.nullcontext():
            out = model(flat)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != batch:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model(inputs) must return a tensor with the {batch} examples on axis 0; got {shape}"
        )
    if any(c.modified() for c in calls):
        raise ValueError(
            "a supported layer's input or output was modified in place after the layer ran (e.g. "
            "nn.ReLU(inplace=True) after nn.Linear); the factored path needs them unchanged. Use "
            "out-of-place activations, or method='vectorized'"
        )
    if env_ids is None:
        losses = _env_losses(loss_fn, out.reshape(n_env, inputs.shape[1], *out.shape[1:]), targets)
    else:
        parts = [_env_losses(loss_fn, out[idx], targets[idx.to(targets.device)]) for _, idx in groups]
        order = torch.cat([envs for envs, _ in groups]).to(out.device)
        losses = torch.cat(parts)[torch.argsort(order)]

    # Parameters factored from the recorded calls, and the rest.
    called = {id(c.module) for c in calls}
    factored: dict[int, list[tuple[_Call, str]]] = {}
    rest: list[torch.Tensor] = []
    for _, p in named:
        ms = owners.get(id(p), [])
        if (
            ms
            and all(id(m) in called and id(m) not in bad for m in ms)
            and all(p is m.weight or p is m.bias for m in ms)  # not e.g. weight_norm's weight_g
        ):
            factored[id(p)] = [
                (c, "weight" if p is c.module.weight else "bias") for m in ms for c in calls if c.module is m
            ]
        else:
            rest.append(p)
    # A factored parameter also used outside its layers' calls (tied weights, F.linear(x, l.weight.t()),
    # a loss term): its factored gradient would miss that use, so it falls back too.
    shared = _used_outside_calls(losses, [p for _, p in named if id(p) in factored], calls)
    for _, p in named:
        if id(p) in shared:
            del factored[id(p)]
            rest.append(p)
    if rest and fallback == "error":
        _refuse(rest, shared, names)

    stats: dict[int, gradand.Statistics] = {}
    if rest:  # the fallback: one batched backward pass per chunk of environments
        eye = torch.eye(n_env, dtype=losses.dtype, device=losses.device)
        scaled = losses if scale is None else losses * scale
        for sl in _chunks(n_env, chunk_size):
            gs = torch.autograd.grad(
                scaled, rest, grad_outputs=eye[sl], retain_graph=True, allow_unused=True,
                materialize_grads=True, is_grads_batched=True,
            )  # fmt: skip
            for p, g in zip(rest, gs):
                try:
                    s = gradand.statistics(unscale(g, scale), combiner, axis=0, nan_policy=policy, xp=XP)
                except ValueError as err:
                    raise with_context(err, f"parameter {names[id(p)]!r} (shape {tuple(p.shape)})") from None
                stats[id(p)] = stats.get(id(p), gradand.Statistics()) + s
            gs = g = None
    used = {id(c) for parts in factored.values() for c, _ in parts}
    needed_calls = [c for c in calls if id(c) in used]
    total = losses.sum() if scale is None else losses.sum() * scale
    ys = [c.y for c in needed_calls]
    deltas = torch.autograd.grad(total, ys, allow_unused=True, materialize_grads=True) if ys else ()
    delta_of = {id(c): d for c, d in zip(needed_calls, deltas)}
    pad = _padding(groups, n_env, batch, inputs.device)
    xp = XP
    for _, p in named:
        parts = factored.get(id(p))
        if parts is None:
            continue
        factors = [_layer_factors(c, delta_of[id(c)], n_env, pad, kind) for c, kind in parts]
        one_row = len(factors) == 1 and factors[0].deltas.shape[1] == 1  # the core's outer path: one chunk
        chunk = chunk_size or (None if one_row else _auto_chunk(p, n_env))
        stats[id(p)] = gradand.layer_statistics(
            factors, combiner, shape=tuple(p.shape), chunk_size=chunk, scale=scale,
            nan_policy=policy, name=f"parameter {names[id(p)]!r}", xp=xp, _defer_check=True,
        )  # fmt: skip
        factors = None
    if policy == "raise":
        _check_means([(names[id(p)], p, stats[id(p)]) for _, p in named if id(p) in factored])
    return losses.detach(), [stats[id(p)] for _, p in named]


def _check_means(items: list[tuple[str, torch.Tensor, gradand.Statistics]]) -> None:
    """``nan_policy="raise"`` for the factored parameters: one sum over all their means (one sync).

    A finite total has no NaN/Inf term; otherwise each mean is checked to name the parameter (an
    overflow of finite values is then no error).
    """
    means = [s.mean for _, _, s in items if s.mean is not None]
    if not means or bool(torch.isfinite(torch.stack([m.sum() for m in means]).sum())):
        return
    for name, p, s in items:
        if s.mean is not None:
            try:
                apply_nan_policy(s.mean, XP, "raise", "a per-environment gradient")
            except ValueError as err:
                raise ValueError(f"parameter {name!r} (shape {tuple(p.shape)}): {err}") from None


def _check_other_batch_norms(model: torch.nn.Module, plain: list[torch.nn.Module]) -> None:
    """BatchNorm layers in train mode that the factored path cannot split per environment."""
    known = {id(m) for m in plain}
    for name, m in model.named_modules():
        if isinstance(m, _BN) and m.training and id(m) not in known:
            raise ValueError(
                f"model contains {type(m).__name__} {name or '(the model itself)'!r} in train mode, "
                f"whose batch statistics the factored path cannot compute per environment (only "
                f"nn.BatchNorm1d/2d/3d with their own forward). Use eval mode for it, or "
                f"gradand.backends.torch.backward with one forward pass per environment"
            )


def _refuse(rest: list[torch.Tensor], shared: set[int], names: dict[int, str]) -> None:
    """``fallback="error"``: the ``ValueError`` listing the parameters that cannot be factored."""
    outside = [f"{names[id(p)]} {tuple(p.shape)}" for p in rest if id(p) not in shared]
    tied = [f"{names[id(p)]} {tuple(p.shape)}" for p in rest if id(p) in shared]
    reasons = []
    if outside:
        reasons.append(f"these parameters are outside them: {outside}")
    if tied:
        reasons.append(
            f"these parameters of such layers are also used outside the layers' calls (tied "
            f"weights, a functional use such as F.linear(x, layer.weight.t()), or a term of the "
            f"loss), which their factored gradient would miss: {tied}"
        )
    raise ValueError(
        f"the factored path handles parameters of {[t.__name__ for t in FACTORED_LAYERS]} layers "
        f"called on batch-first inputs (their weight and bias, used only by those calls); "
        f"{'; '.join(reasons)}. Pass fallback='vectorized' (one vectorised backward pass for them) "
        f"or use method='vectorized'"
    )


def _used_outside_calls(losses: torch.Tensor, params: list[torch.Tensor], calls: list[_Call]) -> set[int]:
    """Ids of the factored parameters that the graph of ``losses`` reaches other than through their calls.

    A walk over the autograd graph from ``losses`` that steps over each recorded
    call (from its output's node straight to its input's node: the call's own
    uses of its weight and bias are the ones the factored gradient accounts
    for). A factored parameter's gradient accumulator reached anyway is used
    elsewhere: a second, unhooked read of the weight (``F.linear(x,
    l.weight.t())``), a loss term (a regulariser), a weight shared with a
    custom op. Autocast's cached casts of a weight are shared by its calls and
    so stepped over too. One visit per node of the graph, no tensor work.
    """
    found: set[int] = set()
    if not params or losses.grad_fn is None:
        return found
    targets = {id(p) for p in params}
    steps = {c.y_node: c.x_node for c in calls if c.y_node is not None}
    seen = {None}
    stack = [losses.grad_fn]
    pop, push = stack.pop, stack.append
    while stack:
        node = pop()
        if node in seen:
            continue
        seen.add(node)
        if node in steps:
            push(steps[node])
        elif (variable := getattr(node, "variable", None)) is not None:  # a leaf's AccumulateGrad
            if id(variable) in targets:
                found.add(id(variable))
        else:
            for child, _ in node.next_functions:
                push(child)
    return found


#: Bytes of per-environment gradients per chunk when ``chunk_size`` is None: small enough that
#: the batched product and the statistics passes over it stay in cache (measured on the spirals
#: MLP, E=64: 2.1x a plain step unchunked, 1.5x in chunks of 8 environments of 256x256).
_CHUNK_BYTES = 2 * 1024 * 1024


def _auto_chunk(p: torch.Tensor, n_env: int) -> int:
    if p.device.type != "cpu":  # accelerators: one batched product, no cache to fit
        return n_env
    return max(1, _CHUNK_BYTES // max(1, p.numel() * max(4, p.element_size())))


def _check_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return one environment's loss as a scalar tensor; got {shape} "
            f"(reduce it with .mean() or reduction='mean')"
        )
    if not loss.is_floating_point():
        raise TypeError(f"loss_fn returned dtype {loss.dtype}; a loss must be floating point")
    return loss


#: PyTorch's losses that are a mean of per-element terms (``reduction="mean"``): each environment's
#: loss is then the mean of its slice of one ``reduction="none"`` call, with the same gradient.
_ELEMENTWISE_MEAN_LOSSES = frozenset({
    F.binary_cross_entropy_with_logits, F.binary_cross_entropy, F.mse_loss, F.l1_loss,
    F.smooth_l1_loss, F.huber_loss, F.cross_entropy, F.nll_loss,
})  # fmt: skip
_CLASS_LOSSES = (F.cross_entropy, F.nll_loss)


def _env_losses_by_elements(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> Any:
    """``(E,)`` from one unreduced call of a known per-element loss, or ``None`` where that differs."""
    if loss_fn not in _ELEMENTWISE_MEAN_LOSSES or outputs.ndim < 2 or targets.ndim < 2:
        return None
    if loss_fn in _CLASS_LOSSES:
        if outputs.ndim < 3:  # (E, n, classes, ...) with class-index or probability targets
            return None
        if not targets.is_floating_point() and bool((targets == -100).any()):  # ignore_index
            return None
    elif outputs.shape != targets.shape:  # broadcasting would pair examples across environments
        return None
    n_env = outputs.shape[0]
    per = loss_fn(outputs.flatten(0, 1), targets.flatten(0, 1), reduction="none")
    return per.reshape(n_env, -1).mean(dim=1)


def _env_losses(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(E,)``: each environment's loss, vectorised when ``loss_fn`` allows it."""
    fast = _env_losses_by_elements(loss_fn, outputs, targets)
    if fast is not None:
        return fast
    try:
        losses = vmap(lambda o, t: _check_loss(loss_fn(o, t)))(outputs, targets)
    except (ValueError, TypeError):
        raise
    except Exception:  # no batching rule, data-dependent control flow, .item(), ...: one at a time
        losses = torch.stack([_check_loss(loss_fn(outputs[e], targets[e])) for e in range(outputs.shape[0])])
    return losses
