"""The step schedule shared by the three backends' training loops."""

from __future__ import annotations

from typing import NamedTuple


class Schedule(NamedTuple):
    """How an epoch is cut into steps.

    Attributes:
        batches_per_epoch: examples per environment // batch_size.
        group: environments per step.
        groups_per_epoch: n_envs // group.
        steps_per_epoch: batches_per_epoch * groups_per_epoch.
    """

    batches_per_epoch: int
    group: int
    groups_per_epoch: int
    steps_per_epoch: int


def schedule(n_envs: int, n_per_env: int, batch_size: int, envs_per_step: int | None) -> Schedule:
    """Validate the batch settings and cut an epoch into steps.

    Example:
        >>> from gradand.experiments._schedule import schedule
        >>> schedule(16, 1024, 256, None)
        Schedule(batches_per_epoch=4, group=16, groups_per_epoch=1, steps_per_epoch=4)
    """
    batches_per_epoch = n_per_env // batch_size
    if batches_per_epoch < 1:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {n_per_env} examples per environment; "
            f"need batch_size <= examples per environment"
        )
    group = n_envs if envs_per_step is None else envs_per_step
    if not 1 <= group <= n_envs:
        raise ValueError(f"envs_per_step must be in [1, {n_envs}] (the number of environments); got {group}")
    groups_per_epoch = n_envs // group
    return Schedule(batches_per_epoch, group, groups_per_epoch, batches_per_epoch * groups_per_epoch)
