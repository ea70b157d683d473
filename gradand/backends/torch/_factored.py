"""The factored strategy: per-environment gradients of linear and conv layers from one backward pass.

A linear layer's weight gradient is a sum of outer products, ``Σ_b δ_b x_bᵀ``
(``x_b`` the layer's input, ``δ_b = ∂loss/∂y_b`` the gradient at its output).
Examples do not interact, so for ``total = Σ_e loss_e`` the output gradient of
an example of environment ``e`` is ``∂loss_e/∂y``, and environment ``e``'s
weight gradient is ``Δ_eᵀ X_e``. One forward pass over every example and one
``torch.autograd.grad`` with respect to the layers' *outputs* (autograd then
skips the weight-gradient matrix products) give every ``Δ``; one batched
matrix product per layer gives the per-environment gradients, whose statistics
and update come from the core (:func:`gradand.statistics`,
:func:`gradand.finalize`). With one example per environment the core's
:func:`gradand.outer_statistics` gives the statistics with no per-example
gradient array at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import vmap

import gradand
from gradand.backends.torch._common import (
    XP,
    check_combiner,
    check_policy,
    finalize_into_grads,
    grad_scale,
    unscale,
    with_context,
)
from gradand.backends.torch._vectorized import check_batch_norm

__all__ = ["FACTORED_LAYERS", "factored_backward"]

LossFn = Callable[[Any, Any], torch.Tensor]

#: Layer types whose parameters the factored strategy handles without
#: per-environment backward passes (exact types or subclasses that keep the
#: base ``forward``). Every other parameter falls back (``fallback=``).
FACTORED_LAYERS: tuple[type[torch.nn.Module], ...] = (torch.nn.Linear, torch.nn.Conv2d)


def _supported(m: torch.nn.Module) -> bool:
    if isinstance(m, torch.nn.Linear):
        return type(m).forward is torch.nn.Linear.forward
    if isinstance(m, torch.nn.Conv2d):
        return (
            type(m).forward is torch.nn.Conv2d.forward
            and m.groups == 1
            and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)
        )
    return False


class _Call:
    """One call of a supported layer: its input (detached) and output (in the graph).

    ``x_node`` is the autograd node of the input (None when it needs no
    gradient): the graph outside the call continues there.
    """

    __slots__ = ("module", "x", "x_node", "x_version", "y", "y_version")

    def __init__(self, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.module, self.x, self.y = module, x.detach(), y
        self.x_version, self.y_version = x._version, y._version
        self.x_node = (
            x.grad_fn
            if x.grad_fn is not None or not x.requires_grad
            else torch.autograd.graph.get_gradient_edge(x).node
        )

    def modified(self) -> bool:
        return self.x._version != self.x_version or self.y._version != self.y_version


def _env_rows(t: torch.Tensor, n_env: int, width: int) -> torch.Tensor:
    """``(E·n, ..., width)`` -> ``(E, rows, width)``: the rows of each environment."""
    return t.reshape(n_env, -1, width)


def _layer_factors(call: _Call, delta: torch.Tensor, n_env: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, Δ)`` of one call as ``(E, rows, in)`` and ``(E, rows, out)``."""
    m = call.module
    if isinstance(m, torch.nn.Linear):
        return _env_rows(call.x, n_env, m.in_features), _env_rows(delta, n_env, m.out_features)
    # Conv2d: im2col; the weight gradient is Σ over examples and positions of δ ⊗ patch.
    cols = torch.nn.functional.unfold(
        call.x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride
    )  # (B, C·kh·kw, L)
    b = cols.shape[0]
    x = cols.transpose(1, 2).reshape(n_env, -1, cols.shape[1])
    d = delta.reshape(b, m.out_channels, -1).transpose(1, 2).reshape(n_env, -1, m.out_channels)
    return x, d


def factored_backward(
    model: torch.nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    combiner: gradand.Combiner,
    *,
    chunk_size: int | None = None,
    fallback: str = "batched",
    nan_policy: str = "raise",
    grad_scaler: Any = None,
    all_reduce: bool = False,
    group: Any = None,
) -> tuple[torch.Tensor, list[gradand.MaskInfo]]:
    """Per-environment gradients from one forward and one backward pass, combined into ``.grad``.

    Same calling convention and result as :func:`vmap_backward` (up to
    floating-point rounding), usually at close to the cost of an ordinary
    training step:

    1. one forward pass over all ``E·n`` examples (the environment axis
       flattened into the batch), with forward hooks on the supported layers
       (:data:`FACTORED_LAYERS`: ``nn.Linear`` on inputs ``(E·n, ..., in)``,
       ``nn.Conv2d`` with ``groups=1``, zero padding given as numbers) that
       record each layer's input ``X`` and output ``y``;
    2. the per-environment losses ``loss_fn(outputs[e], targets[e])`` and one
       ``torch.autograd.grad(Σ_e loss_e, [y, ...])``: the gradients ``Δ`` at
       the layers' outputs, without the weight-gradient products;
    3. per layer, the environments' weight gradients ``Δ_eᵀ X_e`` as one
       batched matrix product ``(E, out, in)`` and bias gradients ``Σ Δ_e``,
       then :func:`gradand.statistics` and :func:`gradand.finalize`. With one
       example per environment (``n == 1``) on a 2-D linear layer and a
       combiner whose statistics are in :data:`gradand.OUTER_STATISTICS`
       (``Mean``, ``AndMask``, ``SandMask``), :func:`gradand.outer_statistics`
       gives the statistics from two or three ``(out, B) × (B, in)`` products
       and no per-example gradient array.

    Cost: one forward, one backward without weight gradients, then per layer
    ``E·n·out·in`` multiply-adds (as many as ordinary training spends on the
    weight gradient) plus elementwise passes over ``E × parameters`` (the
    statistics, in cache-sized chunks of environments), and
    ``chunk_size × (layer size)`` extra memory. Per-example environments on
    linear layers need two matrix products instead of one and no
    ``E × parameters`` array. Conv2d layers also build their im2col patches
    (``kh·kw`` × the layer's input). ``nan_policy="raise"`` checks the summed
    statistics (a NaN or Inf in any environment reaches them) and, only when
    they are not finite, reruns the core's check for its error message.
    Measured on the spirals MLP (CPU, 1 thread, under load), as a ratio to a
    plain-averaging step: 1.13 for 16 environments × 256, 1.37 for 64 × 64,
    3.0 for 128 examples each its own environment (there the fixed
    per-tensor cost of :func:`gradand.finalize` is about one plain step).

    Requirements, as for :func:`vmap_backward`: examples must not interact in
    the forward pass, so BatchNorm in train mode raises ``ValueError``; the
    model must keep the batch axis first in the inputs of supported layers
    (otherwise those layers fall back). Parameters of a supported layer that
    is never called, or that are shared with an unsupported module, fall
    back. So does a parameter also used outside its layers' calls (tied
    weights read directly, e.g. ``F.linear(x, self.lin.weight.t())``, a
    regulariser on it in ``loss_fn``): a walk over the autograd graph of the
    losses, stepping over the recorded calls, finds such a use (a few
    microseconds per graph node; no tensor work). A layer called several
    times, or several supported layers sharing one weight, are factored: each
    call contributes its own ``Δ_eᵀ X_e``.

    Every other parameter that requires grad (LayerNorm, embeddings,
    ``nn.MultiheadAttention``'s projections, custom modules, Conv2d with
    groups, ...) falls back: with ``fallback="batched"`` its per-environment
    gradients come from one vectorised backward pass through the same graph
    (``torch.autograd.grad(..., is_grads_batched=True)``: the same forward,
    so the same dropout masks); with ``fallback="error"`` a ``ValueError``
    lists them.

    Args:
        model: the module; its parameters that require grad are differentiated.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, one environment's
            loss (e.g. ``torch.nn.functional.cross_entropy``); it is called
            under ``torch.func.vmap`` over environments when it can be, one
            environment at a time otherwise.
        inputs: ``(E, n, ...)``: E environments of n examples (``(B, 1, ...)``
            makes every example its own environment).
        targets: ``(E, n, ...)``.
        combiner: ``gradand.Mean()``, ``gradand.AndMask(...)``, ...
        chunk_size: environments per batched matrix product and statistics
            pass; ``None`` picks, on CPU, about 2 MiB of gradients per layer
            (which keeps them in cache: faster than all at once), and all
            environments at once on other devices. The result is the
            same; extra memory is ``chunk_size × (layer size)``.
        fallback: ``"batched"`` or ``"error"``, for parameters outside
            supported layers (see above).
        nan_policy: as in :func:`backward`.
        grad_scaler: a ``torch.amp.GradScaler``, as in :func:`vmap_backward`.
        all_reduce: sum the statistics over the ranks of ``group`` before
            finalizing (each rank passes its own environments).
        group: the process group for ``all_reduce``.

    Returns:
        ``(loss, infos)``: the mean of the environments' losses (detached) and
        one :class:`gradand.MaskInfo` per parameter that requires grad, in
        ``model.parameters()`` order.

    Example:
        >>> import torch, gradand
        >>> from gradand.backends import torch as gt
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(5, 8, 3), torch.randint(0, 2, (5, 8))  # 5 environments of 8 examples
        >>> ce = torch.nn.functional.cross_entropy
        >>> loss, infos = gt.factored_backward(model, ce, x, y, gradand.AndMask(threshold=0.8))
        >>> model[0].weight.grad.shape, len(infos)
        (torch.Size([4, 3]), 4)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be callable (outputs, targets) -> scalar; got {type(loss_fn).__name__}"
        )
    check_combiner(combiner)
    check_policy(nan_policy)
    if fallback not in ("batched", "error"):
        raise ValueError(f"fallback must be 'batched' or 'error'; got {fallback!r}")
    for name, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1; got {chunk_size!r}")
    if inputs.ndim < 2:
        raise ValueError(
            f"inputs must have shape (E, n, ...): environments, then examples; got shape "
            f"{tuple(inputs.shape)} (for one example per environment use inputs[:, None])"
        )
    n_env, n_ex = inputs.shape[0], inputs.shape[1]
    if n_env == 0 or n_ex == 0:
        raise ValueError(
            f"inputs has shape {tuple(inputs.shape)}; need at least one environment and one example each"
        )
    if targets.ndim < 2 or targets.shape[:2] != inputs.shape[:2]:
        raise ValueError(
            f"targets must have shape (E, n, ...) with the same E and n as inputs; got inputs "
            f"{tuple(inputs.shape)} and targets {tuple(targets.shape)}"
        )
    check_batch_norm(model)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameter that requires grad")
    names = {id(p): n for n, p in named}

    # Which module(s) own each trainable parameter.
    owners: dict[int, list[torch.nn.Module]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(m)
    hooked = {id(m): m for ms in owners.values() for m in ms if _supported(m)}

    batch = n_env * n_ex
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
            and (x.ndim == 4 or not isinstance(m, torch.nn.Conv2d))
        )
        if ok:
            calls.append(_Call(m, x, out))
        else:
            bad.add(id(m))

    scale = grad_scale(grad_scaler)
    policy = "propagate" if scale is not None and nan_policy == "raise" else nan_policy

    handles = [m.register_forward_hook(hook) for m in hooked.values()]
    try:
        out = model(inputs.reshape(batch, *inputs.shape[2:]))
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != batch:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model(inputs) must return a tensor with the {batch} examples (E·n = {n_env}·{n_ex}) on "
            f"axis 0; got {shape}"
        )
    if any(c.modified() for c in calls):
        raise ValueError(
            "a supported layer's input or output was modified in place after the layer ran (e.g. "
            "nn.ReLU(inplace=True) after nn.Linear); factored_backward needs them unchanged. Use "
            "out-of-place activations, or vmap_backward"
        )
    losses = _env_losses(loss_fn, out.reshape(n_env, n_ex, *out.shape[1:]), targets)

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
            f"factored_backward handles parameters of {[t.__name__ for t in FACTORED_LAYERS]} layers "
            f"called on batch-first inputs (their weight and bias, used only by those calls); "
            f"{'; '.join(reasons)}. Pass fallback='batched' (one vectorised backward pass for them) "
            f"or use vmap_backward"
        )

    total = losses.sum() if scale is None else losses.sum() * scale
    used = {id(c) for parts in factored.values() for c, _ in parts}
    needed_calls = [c for c in calls if id(c) in used]
    ys = [c.y for c in needed_calls]
    stats: dict[int, gradand.Statistics] = {}
    if rest:
        eye = torch.eye(n_env, dtype=losses.dtype, device=losses.device)
        scaled = losses if scale is None else losses * scale
        for sl in _chunks(n_env, chunk_size):
            gs = torch.autograd.grad(
                scaled,
                rest,
                grad_outputs=eye[sl],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
                is_grads_batched=True,
            )
            for p, g in zip(rest, gs):
                stats[id(p)] = stats.get(id(p), gradand.Statistics()) + _stats(
                    unscale(g, scale), combiner, policy, names[id(p)], p
                )
            gs = g = None
    deltas = torch.autograd.grad(total, ys, allow_unused=True, materialize_grads=True) if ys else ()
    delta_of = {id(c): d for c, d in zip(needed_calls, deltas)}

    outer_ok = n_ex == 1 and set(combiner.statistics) <= gradand.OUTER_STATISTICS
    for _, p in named:
        parts = factored.get(id(p))
        if parts is None:
            continue
        name = names[id(p)]
        if outer_ok and len(parts) == 1 and isinstance(parts[0][0].module, torch.nn.Linear):
            c, kind = parts[0]
            if c.x.ndim == 2:  # every example its own environment: no per-example gradient array
                d = unscale(delta_of[id(c)], scale)
                s = gradand.Statistics()
                for sl in _chunks(n_env, chunk_size):
                    if kind == "weight":
                        s = s + _outer_stats(c.x[sl], d[sl], combiner, policy, name, p)
                    else:
                        s = s + _stats(d[sl], combiner, policy, name, p)
                stats[id(p)] = s
                continue
        factors = [(_layer_factors(c, delta_of[id(c)], n_env), kind) for c, kind in parts]
        s = gradand.Statistics()
        for sl in _chunks(n_env, chunk_size or _auto_chunk(p, n_env)):
            g = None
            for (x, d), kind in factors:
                if kind == "bias":
                    gi = d[sl].sum(1)
                elif x.shape[-1] < d.shape[-1]:  # narrow inputs: (in, out) products are faster on CPU
                    gi = (x[sl].mT @ d[sl]).mT.contiguous()
                else:
                    gi = d[sl].mT @ x[sl]
                g = gi if g is None else g + gi
            g = g.reshape(g.shape[0], *p.shape)
            s = s + _stats(unscale(g, scale), combiner, policy, name, p)
            g = gi = None
        stats[id(p)] = s

    reduced = [stats[id(p)] for _, p in named]
    if all_reduce:
        from gradand.backends.torch._distributed import all_reduce_statistics

        reduced = all_reduce_statistics(reduced, group=group)
    infos = finalize_into_grads([p for _, p in named], reduced, combiner, scale)
    return losses.detach().mean(), infos


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
    targets = {torch.autograd.graph.get_gradient_edge(p).node: id(p) for p in params}
    steps = {c.y.grad_fn: c.x_node for c in calls if c.y.grad_fn is not None}
    seen = set()
    stack = [losses.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in steps:
            stack.append(steps[node])
            continue
        pid = targets.get(node)
        if pid is not None:
            found.add(pid)
            continue
        stack.extend(child for child, _ in node.next_functions)
    return found


#: Bytes of per-environment gradients per chunk when ``chunk_size`` is None: small enough that
#: the batched product and the statistics passes over it stay in cache (measured on the spirals
#: MLP, E=64: 2.1x a plain step unchunked, 1.5x in chunks of 8 environments of 256x256).
_CHUNK_BYTES = 2 * 1024 * 1024


def _auto_chunk(p: torch.Tensor, n_env: int) -> int:
    if p.device.type != "cpu":  # accelerators: one batched product, no cache to fit
        return n_env
    return max(1, _CHUNK_BYTES // max(1, p.numel() * max(4, p.element_size())))


def _chunks(n: int, chunk_size: int | None) -> list[slice]:
    step = n if chunk_size is None else chunk_size
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class _SignNoNaNCheck:
    """The core's torch namespace with ``torch.sign`` (one pass) in place of the NaN-propagating one.

    Only used under ``nan_policy="raise"``, where a non-finite gradient is
    caught afterwards from the summed statistics (every combiner needs
    ``sum``, which a NaN or Inf in any environment makes non-finite).
    """

    sign = staticmethod(torch.sign)

    def __getattr__(self, name: str) -> Any:
        return getattr(XP, name)


_FAST_XP = _SignNoNaNCheck()


def _stats(g: torch.Tensor, combiner: gradand.Combiner, policy: str, name: str, p: torch.Tensor) -> Any:
    """The core's statistics of ``g`` (E, ...), with the "raise" check on the (E× smaller) sums."""
    try:
        if policy != "raise":
            return gradand.statistics(g, combiner, axis=0, nan_policy=policy, xp=XP)
        s = gradand.statistics(g, combiner, axis=0, nan_policy="propagate", xp=_FAST_XP)
        if not bool(torch.isfinite(s.mean).all()):  # every combiner averages g: a NaN/Inf reaches the mean
            s = gradand.statistics(g, combiner, axis=0, nan_policy="raise", xp=XP)  # the core's error
        return s
    except ValueError as err:
        raise with_context(err, f"parameter {name!r} (shape {tuple(p.shape)})") from None


def _outer_stats(
    x: torch.Tensor, d: torch.Tensor, combiner: gradand.Combiner, policy: str, name: str, p: torch.Tensor
) -> Any:
    """The core's :func:`gradand.outer_statistics`, with the "raise" check on the sums (as in _stats)."""
    try:
        if policy != "raise":
            return gradand.outer_statistics(x, d, combiner, nan_policy=policy, xp=XP)
        s = gradand.outer_statistics(x, d, combiner, nan_policy="propagate", xp=_FAST_XP)
        if not bool(torch.isfinite(s.mean).all()):  # a NaN/Inf in x or d reaches Δᵀ X
            s = gradand.outer_statistics(x, d, combiner, nan_policy="raise", xp=XP)
        return s
    except ValueError as err:
        raise with_context(err, f"parameter {name!r} (shape {tuple(p.shape)})") from None


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


def _env_losses(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(E,)``: each environment's loss, vectorised when ``loss_fn`` allows it."""
    try:
        losses = vmap(lambda o, t: _check_loss(loss_fn(o, t)))(outputs, targets)
    except (ValueError, TypeError):
        raise
    except Exception:  # no batching rule, data-dependent control flow, .item(), ...: one at a time
        losses = torch.stack([_check_loss(loss_fn(outputs[e], targets[e])) for e in range(outputs.shape[0])])
    return losses
