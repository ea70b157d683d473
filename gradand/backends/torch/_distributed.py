"""Distributed AND-masking: all-reduce the core's statistics (SUM) instead of averaging gradients.

Every combiner is a function of additive statistics, so the environments may
live on different ranks: each rank sums the statistics of its own
environments, one all-reduce (SUM) adds them up, and every rank finalizes the
same update as one process that saw every environment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, overload

import torch
import torch.distributed as dist

import gradand
from gradand import _stats as gradand_stats
from gradand.backends.torch._common import XP, check_combiner, check_policy, detach_info

__all__ = ["CommHookState", "all_reduce_statistics", "comm_hook", "register_comm_hook"]


def _accumulation_dtype(a: torch.Tensor) -> torch.dtype:
    return torch.float32 if torch.finfo(a.dtype).bits < 32 else a.dtype


def _flat_all_reduce(arrays: Sequence[torch.Tensor], group: Any) -> list[torch.Tensor]:
    """All-reduce (SUM) a list of tensors, one flat buffer per dtype."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, a in enumerate(arrays):
        by_dtype.setdefault(a.dtype, []).append(i)
    out: list[Any] = [None] * len(arrays)
    for idx in by_dtype.values():
        flat = torch.cat([arrays[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for i in idx:
            a = arrays[i]
            out[i] = flat[offset : offset + a.numel()].view(a.shape)
            offset += a.numel()
    return out


def _describe(meta: dict[str, Any]) -> str:
    shapes = ", ".join(str(tuple(s)) for s in meta["shapes"])
    n = len(meta["shapes"])
    return f"{n} tensors of shapes [{shapes}], fields {meta['fields']}, dtypes {meta['dtypes']}"


@overload
def all_reduce_statistics(stats: gradand.Statistics, group: Any = None) -> gradand.Statistics: ...
@overload
def all_reduce_statistics(
    stats: Iterable[gradand.Statistics], group: Any = None
) -> list[gradand.Statistics]: ...
def all_reduce_statistics(stats: Any, group: Any = None) -> Any:
    """Sum statistics over the ranks of a process group (every rank calls this).

    Each rank passes the statistics of its own environments (one
    :class:`gradand.Statistics`, or a list, one per parameter tensor); every
    rank gets back the statistics of all ranks' environments, as if one
    process had seen them all. ``count`` comes back as a Python int.

    Before summing, the ranks exchange what they pass (shapes, fields,
    dtypes, ``eps``; a small ``all_gather_object``), so a rank whose gradient
    has another shape makes *every* rank raise ``ValueError`` naming the
    ranks and shapes, instead of hanging or summing garbage. Then each dtype's
    fields travel in one flat all-reduce.

    Args:
        stats: one ``Statistics`` or a sequence of them (torch tensors),
            none of them empty.
        group: the process group (``None``: the default group).

    Returns:
        The summed ``Statistics`` (or a list of them, in the same order).

    Example:
        >>> import torch, gradand
        >>> from gradand.backends import torch as gt
        >>> c = gradand.AndMask()
        >>> # rank 0 and rank 1 each hold the statistics of their own environments ...
        >>> on_rank0 = gradand.statistics(torch.tensor([[1.0, -1.0]]), c)
        >>> on_rank1 = gradand.statistics(torch.tensor([[2.0, 1.0], [3.0, 1.0]]), c)
        >>> # ... and `gt.all_reduce_statistics(on_rank0)` on rank 0 (`on_rank1` on rank 1)
        >>> # returns on both ranks what merging them in one process gives:
        >>> total = gradand.merge(on_rank0, on_rank1)
        >>> total.count, total.sign_sum
        (3, tensor([3, 1], dtype=torch.int32))
    """
    single = isinstance(stats, gradand.Statistics)
    items = [stats] if single else list(stats)
    if not items:
        raise ValueError("stats is empty: pass one Statistics per parameter tensor")
    for i, s in enumerate(items):
        where = "stats" if single else f"stats[{i}]"
        if not isinstance(s, gradand.Statistics):
            raise TypeError(f"{where} must be gradand.Statistics; got {type(s).__name__}")
        if s.is_empty:
            raise ValueError(
                f"{where} is empty (no environment on this rank); every rank must contribute at least "
                f"one environment"
            )
        for name, a in s.arrays().items():
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"{where}.{name} must be a torch.Tensor; got {type(a).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "all_reduce_statistics needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group)"
        )
    meta = {
        "shapes": [tuple(s.shape) for s in items],
        "fields": [s.fields for s in items],
        "dtypes": [str(s.dtype) for s in items],
        "eps": [s.eps for s in items],
        "counts": [int(s.count) for s in items],
    }
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, meta, group=group)
    keys = ("shapes", "fields", "dtypes", "eps")
    bad = [r for r, m in enumerate(gathered) if any(m[k] != gathered[0][k] for k in keys)]
    if bad:
        me = dist.get_rank(group)
        lines = "; ".join(f"rank {r}: {_describe(m)}" for r, m in enumerate(gathered))
        raise ValueError(
            f"all_reduce_statistics: the ranks passed statistics that cannot be summed (rank(s) {bad} "
            f"differ from rank 0; this is rank {me}). Every rank must pass the same tensors, in the "
            f"same order, for the same combiner: {lines}"
        )
    totals = {sum(m["counts"][i] for m in gathered) for i in range(len(items))}
    out = gradand.all_reduce_statistics(
        items,
        lambda arrays: _flat_all_reduce(arrays, group),
        total_count=totals.pop() if len(totals) == 1 else None,
    )
    return out[0] if single else out


@dataclasses.dataclass
class CommHookState:
    """State of :func:`comm_hook`: the combiner, the group, and the last step's infos.

    Attributes:
        combiner: the gradand combiner.
        group: the process group (``None``: the default group).
        nan_policy: as in :func:`gradand.statistics`.
        infos: after each backward, ``{parameter: MaskInfo}`` of the last
            step (read it with :meth:`mask_infos`).

    Example:
        >>> import gradand
        >>> from gradand.backends import torch as gt
        >>> gt.CommHookState(gradand.AndMask(threshold=0.5)).combiner
        AndMask(threshold=0.5, rescale=True)
    """

    combiner: gradand.Combiner
    group: Any = None
    nan_policy: str = "raise"
    infos: dict[torch.Tensor, gradand.MaskInfo] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_combiner(self.combiner)
        check_policy(self.nan_policy)

    def mask_infos(self, params: Iterable[torch.Tensor]) -> list[gradand.MaskInfo]:
        """The last step's :class:`gradand.MaskInfo` of ``params``, in their order."""
        out = []
        for i, p in enumerate(params):
            if p not in self.infos:
                raise KeyError(
                    f"no mask info for params[{i}] (shape {tuple(p.shape)}): it was not reduced by "
                    f"the hook yet (no backward since registering, or it does not require grad)"
                )
            out.append(self.infos[p])
        return out


def comm_hook(state: CommHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: every rank's gradient is one environment.

    Instead of averaging the bucket's gradients, each rank computes the
    statistics of its own gradient (count 1), one asynchronous all-reduce
    (SUM) of the count-weighted means and exact sign votes merges them over
    the ranks (``SandMask`` needs a second, blocking round for ``M2``), and
    every rank writes ``gradand.finalize`` of the merged statistics:
    the same update as :func:`backward` with one loss per rank. DDP already
    checks at construction that every rank has the same parameter shapes.
    Register it with :func:`register_comm_hook` or
    ``ddp.register_comm_hook(CommHookState(combiner), comm_hook)``.

    For several environments per rank, reduce them locally first:
    call :func:`backward` or :func:`model_backward` with ``all_reduce=True``
    (on the plain module, or inside ``ddp.no_sync()``).

    Example:
        >>> import gradand
        >>> from gradand.backends import torch as gt
        >>> state = gt.CommHookState(gradand.AndMask(threshold=1.0))
        >>> # after torch.distributed.init_process_group(...) on every rank:
        >>> # ddp = torch.nn.parallel.DistributedDataParallel(model)
        >>> # ddp.register_comm_hook(state, gt.comm_hook)
        >>> # loss.backward()  -> .grad holds the AND-mask over the ranks' gradients
        >>> # state.mask_infos(model.parameters())  -> this step's MaskInfo per parameter
        >>> state.infos
        {}
    """
    combiner = state.combiner
    grads = bucket.gradients()
    params = bucket.parameters()
    items = [gradand.statistics(g, combiner, axis=None, nan_policy=state.nan_policy, xp=XP) for g in grads]
    world = dist.get_world_size(state.group)

    def write(reduced: Sequence[gradand.Statistics]) -> torch.Tensor:
        for s, g, p in zip(reduced, grads, params):
            update, info = gradand.finalize(s, combiner, return_info=True, xp=XP)
            g.copy_(update)
            state.infos[p] = detach_info(info)
        return bucket.buffer()

    if "m2" in combiner.statistics:  # two rounds (M2 needs the global mean): reduce now
        reduced = gradand.all_reduce_statistics(
            items, lambda arrays: _flat_all_reduce(arrays, state.group), total_count=world
        )
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(write(reduced))
        return done
    # one asynchronous round: the count is the world size, each rank's terms in one flat buffer
    dtype = _accumulation_dtype(grads[0])
    terms = [gradand_stats.reduction_terms(s, world) for s in items]
    flat = torch.cat([a.to(dtype).reshape(-1) for t in terms for a in t.values()])
    fut = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=state.group, async_op=True).get_future()

    def finish(f: torch.futures.Future[Any]) -> torch.Tensor:
        value = f.value()
        summed = value[0] if isinstance(value, (list, tuple)) else value
        offset = 0
        reduced = []
        for s, t in zip(items, terms):
            fields = {}
            for name, a in t.items():
                fields[name] = summed[offset : offset + a.numel()].view(a.shape).to(a.dtype)
                offset += a.numel()
            reduced.append(s.replace(count=world, **fields))
        return write(reduced)

    return fut.then(finish)


# DDP checks a hook's annotations by identity; with postponed (string) annotations it would refuse it.
comm_hook.__annotations__.update(
    state=CommHookState, bucket=dist.GradBucket, **{"return": torch.futures.Future[torch.Tensor]}
)


def register_comm_hook(
    ddp: torch.nn.parallel.DistributedDataParallel,
    combiner: gradand.Combiner,
    *,
    group: Any = None,
    nan_policy: str = "raise",
) -> CommHookState:
    """Make ``ddp`` combine the ranks' gradients with ``combiner`` instead of averaging.

    Each rank's gradient (of its own loss) is one environment; see
    :func:`comm_hook`. ``group`` defaults to the group that ``ddp`` reduces
    over. Returns the hook's state, whose :meth:`CommHookState.mask_infos`
    gives the last step's infos.

    In a script run with ``torchrun --nproc_per_node=2`` (see
    ``examples/torch_ddp.py``)::

        dist.init_process_group("gloo")  # or "nccl"
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        hook = gt.register_comm_hook(ddp, gradand.AndMask(threshold=1.0))
        loss_fn(ddp(x), y).backward()  # .grad: the AND-mask over the ranks' gradients
        optimizer.step()
        hook.mask_infos(model.parameters())  # this step's MaskInfo per parameter

    Example:
        >>> import gradand
        >>> from gradand.backends import torch as gt
        >>> class FakeDDP:  # stands in for DistributedDataParallel in this example
        ...     process_group = None
        ...     def register_comm_hook(self, state, hook):
        ...         self.registered = (state, hook)
        >>> ddp = FakeDDP()
        >>> hook = gt.register_comm_hook(ddp, gradand.AndMask(threshold=1.0))
        >>> ddp.registered == (hook, gt.comm_hook), hook.combiner
        (True, AndMask(threshold=1.0, rescale=True))
    """
    if group is None:
        group = getattr(ddp, "process_group", None)  # the group DDP itself reduces over
    state = CommHookState(combiner, group=group, nan_policy=nan_policy)
    ddp.register_comm_hook(state, comm_hook)
    return state
