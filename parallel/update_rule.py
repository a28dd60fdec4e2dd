"""The seam between ZeRO-1 and the math of an optimizer: an update rule steps one shard.

ZeRO-1 (parallel/zero1.py) owns the buffers, the collectives, the global grad norm and
clipping; a rule owns only the update. Per bucket and rank the rule gets a
`BucketShard`, this rank's slice of the bucket with everything it may need:

    BucketShard of bucket b on rank r of a group of N ranks
    ┌──────────────────────────────────────────────────────────────────────────────┐
    │ layout   the bucket: every ParamSlot (name, shape, offset, decay), shard_range│
    │ pieces   the ShardPieces of THIS shard: which part of which parameter it holds│
    │ master   fp32 master weights of the shard  [S]       (updated in place)       │
    │ state    {name: fp32 [S]} the rule's per-element state, zero at the start,    │
    │          checkpointed as `optim.<param>.<name>` and re-sharded on load       │
    │ plan     what `rule.prepare(shard)` returned, once, at construction           │
    │ all_gather(t_S) -> t[padded]   a collective over the group (whole matrices)   │
    │ process_group, rank, size      for any other collective                       │
    └──────────────────────────────────────────────────────────────────────────────┘
    grad_S   the summed (reduce-scattered) and clipped fp32 gradient of the shard [S]

A rule is any object with

    state_names: tuple[str, ...]                       e.g. AdamW ("exp_avg", "exp_avg_sq")
    prepare(shard) -> plan                             once per bucket (e.g. decay ranges)
    update(shard, grad_S, *, lr, step) -> None         every step; step counts from 1

How a matrix rule (Muon) fits: it keeps its momentum as state ("momentum"), updates
it elementwise on the shard, calls `shard.all_gather(momentum_S)` to see every whole
matrix of the bucket (a matrix never straddles two buckets), runs Newton-Schulz on the
matrices its `pieces` overlap (an expert matrix is its own slot) and writes back only
the local slice ``[piece.param_start, piece.param_start + piece.numel)``; per-head
scaling after the update (QK-Clip) touches rows of `q_up`/`kv_up` through the same
pieces. Collectives inside `update` are legal because ZeRO-1 calls `update` for every
bucket of every group in one fixed order (group list order, bucket index ascending)
on every rank of the group; a rule must decide whether to communicate from the layout
(shapes, names), never from values that differ between ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from parallel.bucket_layout import BucketLayout, ShardPiece

# torch 2.13 renamed the flat collectives (the old names warn); older torch lacks the new.
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class BucketShard:
    """This rank's shard of one bucket, as an update rule sees it."""

    layout: BucketLayout
    rank: int  # this rank's index in the group (0 for a world of one)
    size: int
    process_group: dist.ProcessGroup | None
    pieces: tuple[ShardPiece, ...]
    master: torch.Tensor  # fp32 [shard_numel]
    state: dict[str, torch.Tensor]  # name -> fp32 [shard_numel]
    plan: Any = field(default=None)

    def all_gather(self, shard_S: torch.Tensor) -> torch.Tensor:
        """Collective over the group: every rank's [shard_numel] slice -> [padded_numel]."""
        if shard_S.shape != (self.layout.shard_numel,):
            raise ValueError(f"all_gather takes a [{self.layout.shard_numel}] shard, got "
                             f"{tuple(shard_S.shape)}")
        if self.size == 1:
            return shard_S
        out = shard_S.new_empty(self.layout.padded_numel)
        all_gather_flat(out, shard_S, group=self.process_group)
        return out


class UpdateRule(Protocol):
    """An optimizer's math on flat fp32 shards (see the module docstring)."""

    state_names: tuple[str, ...]

    def prepare(self, shard: BucketShard) -> Any:
        """Precompute what `update` needs from the layout; stored as ``shard.plan``."""

    def update(self, shard: BucketShard, grad_S: torch.Tensor, *, lr: float, step: int) -> None:
        """Step ``shard.master`` and ``shard.state`` in place with the clipped gradient."""
