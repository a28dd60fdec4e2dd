"""Where every parameter of a ZeRO-1 group lives in its flat buckets and rank shards.

A pure function of the parameters' shapes (no communication, no tensors), computed
once when the optimizer is built:

    group params (in order):  p0 [7x5]   p1 [13]   p2 [3x4x5]   p3 [10x11] ...
    buckets (<= bucket_numel, a param never straddles two; a big one gets its own):
        bucket 0: | p0 (35) |                  padded to a multiple of the group size
        bucket 1: | p1 (13) | pad |
        ...
    shards of one bucket over a group of N ranks (S = padded / N):
        rank 0 [0, S)   rank 1 [S, 2S)   ...
    pieces: the overlap of one parameter with one rank's shard (a param may be cut by
        shard boundaries; each element lies in exactly one rank's shard)

The numbers a reduce-scatter produces depend on where an element sits in the bucket
(gloo's ring sums the chunks of a buffer in different orders for 3+ ranks), so this
packing is part of the fp32 bitwise contract: change it and the golden losses move.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives in its group's flat buckets."""

    index: int  # position in the group's parameter list
    name: str
    bucket: int
    offset: int  # first element in the flat bucket
    numel: int
    shape: tuple[int, ...]
    decay: bool

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class ShardPiece:
    """The overlap of one parameter with one rank's shard of a bucket."""

    slot: ParamSlot
    bucket_start: int  # [bucket_start, bucket_end) in flat-bucket coordinates
    bucket_end: int
    shard_start: int  # same first element, in shard coordinates
    param_start: int  # same first element, as a flat index into the parameter

    @property
    def numel(self) -> int:
        return self.bucket_end - self.bucket_start

    @property
    def shard_end(self) -> int:
        return self.shard_start + self.numel


@dataclass(frozen=True)
class BucketLayout:
    """One flat bucket: its parameters and how it splits into ``group_size`` shards."""

    index: int
    slots: tuple[ParamSlot, ...]
    numel: int  # elements used by parameters
    padded_numel: int  # numel rounded up to a multiple of group_size
    group_size: int

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.group_size

    def shard_range(self, rank: int) -> tuple[int, int]:
        """[start, end) of ``rank``'s shard in flat-bucket coordinates."""
        if not 0 <= rank < self.group_size:
            raise ValueError(f"rank {rank} is outside a group of size {self.group_size}")
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    def pieces(self, rank: int) -> list[ShardPiece]:
        """The parameters overlapping ``rank``'s shard, in order."""
        shard_start, shard_end = self.shard_range(rank)
        pieces = []
        for slot in self.slots:
            start, end = max(slot.offset, shard_start), min(slot.end, shard_end)
            if start < end:
                pieces.append(ShardPiece(slot, start, end, start - shard_start,
                                         start - slot.offset))
        return pieces

    def decay_ranges(self, rank: int) -> list[tuple[int, int]]:
        """Shard-coordinate ranges of decayed parameters, adjacent ones merged."""
        ranges: list[tuple[int, int]] = []
        for piece in self.pieces(rank):
            if not piece.slot.decay:
                continue
            if ranges and ranges[-1][1] == piece.shard_start:
                ranges[-1] = (ranges[-1][0], piece.shard_end)
            else:
                ranges.append((piece.shard_start, piece.shard_end))
        return ranges


def plan_buckets(shapes: Sequence[Sequence[int]], names: Sequence[str],
                 decays: Sequence[bool], *, bucket_numel: int,
                 group_size: int) -> list[BucketLayout]:
    """Pack parameters in order into buckets (pure function of shapes; no comms)."""
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    groups_of_slots: list[list[ParamSlot]] = []
    used = 0
    for index, (shape, name, decay) in enumerate(zip(shapes, names, decays, strict=True)):
        numel = 1
        for size in shape:
            numel *= int(size)
        if not groups_of_slots or (used + numel > bucket_numel and used > 0):
            groups_of_slots.append([])
            used = 0
        groups_of_slots[-1].append(ParamSlot(index, name, len(groups_of_slots) - 1, used,
                                             numel, tuple(int(s) for s in shape), decay))
        used += numel
    buckets = []
    for bucket_index, slots in enumerate(groups_of_slots):
        numel = slots[-1].end
        padded = -(-max(numel, 1) // group_size) * group_size
        buckets.append(BucketLayout(bucket_index, tuple(slots), numel, padded, group_size))
    return buckets
