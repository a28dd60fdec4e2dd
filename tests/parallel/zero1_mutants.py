"""Deliberately broken ZeRO-1 gradient reductions, which the equivalence tests must catch.

Both leave each rank updating its shard with its OWN gradient instead of the group's
sum, the two ways an overlapped reduce-scatter goes wrong: a bucket whose collective is
never issued, and a shard read before its collective has written it (deterministic
here: the read returns what the shard held when the collective was launched, the value
a reader racing the collective can see).
"""
from __future__ import annotations

from typing import Callable

from parallel.zero1 import ShardedGroup, Zero1Optimizer


def drop_reduce_scatter(opt: Zero1Optimizer, dropped: Callable[[ShardedGroup, int], bool]) -> None:
    """Buckets for which `dropped(group, bucket)` holds are never reduced."""
    launch = opt._launch_reduce_scatter
    opt._launch_reduce_scatter = lambda g, b: None if dropped(g, b) else launch(g, b)


def read_before_reduce_scatter(opt: Zero1Optimizer) -> None:
    """Every bucket's shard is read as it was before its reduce-scatter completed."""
    launch, wait = opt._launch_reduce_scatter, opt._wait_reduce_scatter
    before = {}

    def launch_and_peek(group, b):
        before[id(group), b] = group.grad_shard(b).clone()
        launch(group, b)

    def read_without_waiting(group, b):
        wait(group, b)  # keep every rank's collective sequence intact
        return group.grad_shard(b).copy_(before.pop((id(group), b)))

    opt._launch_reduce_scatter = launch_and_peek
    opt._wait_reduce_scatter = read_without_waiting
