"""ZeRO-1: optimizer state sharded over each parameter group's process group.

Every rank of a group holds the full (replicated) fp32 parameters and computes full
local gradients; the AdamW moments are split so each rank keeps and updates only its
1/N contiguous slice of every bucket. One step, per group and bucket::

    rank r:  params p[0..k)   grads g_r[0..k)                (replicated params, local grads)
               |  copy grads into one flat fp32 bucket, zero padding to a multiple of N
               v
    flat_r = [ g_r(p0) | g_r(p1) | ... | g_r(pk) | 0 pad ]
               |  reduce_scatter_tensor(SUM) over the group
               v
    grad shard r = sum over ranks of flat[r*S:(r+1)*S]       (S = padded / N)
               |  global norm  -> clip  -> AdamW on shard r (m, v held for shard r only)
               v
    param shard r  --all_gather_into_tensor-->  flat params --copy--> p[0..k) on every rank

Gradients are SUMMED, not averaged: the loss is already normalised by the global token
count, so the sum over the group is the true gradient.

Global norm and why one world all-reduce counts every element once: each rank squares
and sums the reduced shards it owns in all its groups, then one all_reduce(SUM) over
``norm_group`` (the world in production) adds them. Dense params of a pipeline stage
are sharded over that stage's DP group and different stages hold different params;
expert params are sharded over the expert-DP group of their EP rank and different EP
ranks hold different experts; a group of ``None`` (world of one) holds params nobody
else holds (e.g. a stage with DP = 1). So across the world every unique parameter
element lies in exactly one rank's shard, and the sum is the squared norm of the full
gradient. A caller that registers the same parameter on two ranks outside a common
group breaks this and over-counts the norm.

Weight decay: decided per parameter by ``decay_rule(name, param)``; the default decays
matrices and higher (ndim >= 2) and leaves biases and norm scales alone.

Layout for a later matrix optimizer (Muon): ``ShardedGroup.buckets`` lists, per bucket,
a ``ParamSlot`` for each parameter (its [offset, offset + numel) in the flat bucket and
its shape) and ``BucketLayout.pieces(rank)`` says which part of a rank's shard each
parameter overlaps, so such an optimizer can gather a whole matrix's gradient or pick
another split.

Buckets: parameters are packed in order into buckets of at most ``bucket_numel``
elements; a parameter never straddles two buckets; one larger than ``bucket_numel``
gets a bucket of its own (so a matrix always lies whole in one bucket). The flat
buffers exist only during ``step()``, one bucket at a time, so the transient memory is
one bucket; the per-step grad shards total 1/N of the group's parameters.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from parallel.adamw import AdamWConfig, adamw_update_

# torch 2.13 renamed the flat collectives (the old names warn); older torch lacks the new.
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

DEFAULT_BUCKET_NUMEL = 40_000_000

DecayRule = Callable[[str, torch.Tensor], bool]


def decay_matrices_only(name: str, param: torch.Tensor) -> bool:
    """Default weight-decay rule: decay weights of rank >= 2, not biases or norm scales."""
    del name
    return param.dim() >= 2


@dataclass
class ParamGroup:
    """Parameters sharded together over ``process_group`` (``None``: a world of one).

    Every rank of ``process_group`` must pass the same parameters (shapes, order).
    ``names`` only serve the decay rule and error messages; default ``"p<i>"``.
    """

    params: list[nn.Parameter]
    process_group: dist.ProcessGroup | None
    names: list[str] | None = None


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
            start, end = piece.shard_start, piece.shard_start + piece.numel
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
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


@dataclass
class ShardedGroup:
    """One param group as this rank sees it: layout plus this rank's AdamW moments."""

    params: list[nn.Parameter]
    process_group: dist.ProcessGroup | None
    rank: int  # this rank's index inside process_group (0 for a world of one)
    size: int
    buckets: list[BucketLayout]
    exp_avg: list[torch.Tensor] = field(default_factory=list)  # one shard per bucket
    exp_avg_sq: list[torch.Tensor] = field(default_factory=list)


class Zero1Optimizer:
    """AdamW with ZeRO-1 sharded state over several param groups and one global clip.

    ``step(lr)`` reduce-scatters (SUM) the gradients, computes the global grad norm
    over ``norm_group``, clips (``max_grad_norm <= 0`` disables), steps each shard and
    all-gathers the parameters; it returns the pre-clip norm as a 0-d fp32 tensor.
    A parameter whose ``.grad`` is None counts as a zero gradient (all ranks of its group
    must still take part in the collectives).

    Collectives run group by group in list order, so ranks whose groups share ranks must
    list those groups in the same order (e.g. dense, then experts, then encoder).
    ``norm_group`` may be None only in a single-process job.
    """

    def __init__(self, param_groups: Sequence[ParamGroup | tuple], *,
                 norm_group: dist.ProcessGroup | None,
                 config: AdamWConfig = AdamWConfig(),
                 max_grad_norm: float = 1.0,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL,
                 decay_rule: DecayRule = decay_matrices_only) -> None:
        self.config = config
        self.max_grad_norm = float(max_grad_norm)
        self.norm_group = norm_group
        self.step_count = 0
        groups = [g if isinstance(g, ParamGroup) else ParamGroup(*g) for g in param_groups]
        self._check_params(groups)
        self.device = groups[0].params[0].device if groups and groups[0].params else \
            torch.device("cpu")
        self.groups: list[ShardedGroup] = []
        for group_index, group in enumerate(groups):
            self.groups.append(self._build_group(group_index, group, bucket_numel, decay_rule))
        if norm_group is None and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            raise ValueError("norm_group is None in a job of more than one rank; pass the world "
                             "group as norm_group so the grad norm covers every rank's shard")

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _check_params(groups: Sequence[ParamGroup]) -> None:
        seen: dict[int, str] = {}
        devices = set()
        for group_index, group in enumerate(groups):
            if not group.params:
                raise ValueError(f"ZeRO-1 param group {group_index} is empty; leave it out")
            if group.names is not None and len(group.names) != len(group.params):
                raise ValueError(f"ZeRO-1 param group {group_index}: {len(group.names)} names "
                                 f"for {len(group.params)} params")
            for i, param in enumerate(group.params):
                where = f"param group {group_index}, param #{i} " \
                        f"({group.names[i] if group.names else 'p' + str(i)})"
                if param.dtype != torch.float32:
                    raise ValueError(f"ZeRO-1 keeps fp32 params as their own master copy; "
                                     f"{where} is {param.dtype}: convert the model to fp32")
                if not param.requires_grad:
                    raise ValueError(f"{where} does not require grad; leave frozen params out "
                                     f"of the optimizer")
                if not param.is_contiguous():
                    raise ValueError(f"{where} is not contiguous; call .contiguous() on it")
                if id(param) in seen:
                    raise ValueError(f"{where} is the same tensor as {seen[id(param)]}; a param "
                                     f"must be in exactly one group once")
                seen[id(param)] = where
                devices.add(param.device)
        if len(devices) > 1:
            raise ValueError(f"ZeRO-1 params must share one device, got {sorted(map(str, devices))}")

    def _build_group(self, group_index: int, group: ParamGroup, bucket_numel: int,
                     decay_rule: DecayRule) -> ShardedGroup:
        names = group.names or [f"p{i}" for i in range(len(group.params))]
        decays = [bool(decay_rule(n, p)) for n, p in zip(names, group.params)]
        shapes = [tuple(p.shape) for p in group.params]
        pg = group.process_group
        if pg is None:
            rank, size = 0, 1
        else:
            rank, size = dist.get_rank(pg), dist.get_world_size(pg)
            if rank < 0:
                raise ValueError(f"ZeRO-1 param group {group_index}: this rank "
                                 f"({dist.get_rank()}) is not a member of its process group")
            self._check_same_layout(group_index, pg, names, shapes, decays)
        buckets = plan_buckets(shapes, names, decays, bucket_numel=bucket_numel,
                               group_size=size)
        sharded = ShardedGroup(list(group.params), pg, rank, size, buckets)
        for bucket in buckets:
            sharded.exp_avg.append(torch.zeros(bucket.shard_numel, device=self.device))
            sharded.exp_avg_sq.append(torch.zeros(bucket.shard_numel, device=self.device))
        return sharded

    def _check_same_layout(self, group_index: int, pg: dist.ProcessGroup, names: list[str],
                           shapes: list[tuple[int, ...]], decays: list[bool]) -> None:
        """Compare a digest of (shapes, decay flags) over the group; on mismatch gather the
        full descriptions so the error names both ranks' parameters (every rank raises)."""
        description = [(shape, decay) for shape, decay in zip(shapes, decays)]
        digest = int.from_bytes(hashlib.sha256(repr(description).encode()).digest()[:7], "big")
        mine = torch.tensor([digest, len(shapes)], dtype=torch.int64, device=self.device)
        size = dist.get_world_size(pg)
        everyone = torch.empty(size * 2, dtype=torch.int64, device=self.device)
        _all_gather_flat(everyone, mine, group=pg)
        if bool((everyone.view(size, 2) == mine).all()):
            return
        described = [None] * size
        dist.all_gather_object(described, list(zip(names, shapes, decays)), group=pg)
        global_ranks = dist.get_process_group_ranks(pg)
        layouts = [[item[1:] for item in items] for items in described]
        other = next(r for r in range(size) if layouts[r] != layouts[0])
        a, b = described[0], described[other]
        diff = next((i for i in range(min(len(a), len(b))) if a[i][1:] != b[i][1:]),
                    min(len(a), len(b)))

        def entry(items: list, i: int) -> str:
            if i >= len(items):
                return f"no param #{i} (only {len(items)} params)"
            name, shape, decay = items[i]
            return f"param #{i} {name!r} shape {tuple(shape)} decay={decay}"

        raise ValueError(
            f"ZeRO-1 param group {group_index}: ranks {global_ranks[0]} and "
            f"{global_ranks[other]} of its process group hold different parameter layouts: "
            f"rank {global_ranks[0]} has {entry(a, diff)}, rank {global_ranks[other]} has "
            f"{entry(b, diff)}. Every rank of a group must pass the same params (shapes, "
            f"order, decay) to the optimizer.")

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, lr: float) -> torch.Tensor:
        grad_shards = [[self._reduce_scatter_bucket(g, b) for b in g.buckets]
                       for g in self.groups]
        sum_of_squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for shards in grad_shards:
            for shard_S in shards:
                sum_of_squares += torch.linalg.vector_norm(shard_S, dtype=torch.float64) ** 2
        if self.norm_group is not None:
            dist.all_reduce(sum_of_squares, op=dist.ReduceOp.SUM, group=self.norm_group)
        total_norm = sum_of_squares.sqrt().float()
        if self.max_grad_norm > 0:
            clip_coef = (self.max_grad_norm / (total_norm + 1e-6)).clamp(max=1.0)
            for shards in grad_shards:
                torch._foreach_mul_(shards, clip_coef)
        self.step_count += 1
        for group, shards in zip(self.groups, grad_shards):
            for bucket, grad_S in zip(group.buckets, shards):
                self._step_bucket(group, bucket, grad_S, lr)
        return total_norm

    def _reduce_scatter_bucket(self, group: ShardedGroup, bucket: BucketLayout) -> torch.Tensor:
        """This rank's shard of the bucket's gradient, summed over the group."""
        flat = torch.zeros(bucket.padded_numel, device=self.device)
        for slot in bucket.slots:
            grad = group.params[slot.index].grad
            if grad is None:
                continue
            if grad.shape != group.params[slot.index].shape or grad.dtype != torch.float32:
                raise ValueError(f"grad of {slot.name!r} is {grad.dtype} {tuple(grad.shape)}, "
                                 f"expected float32 {slot.shape}")
            flat[slot.offset:slot.end].copy_(grad.reshape(-1))
        if group.size == 1:
            return flat
        shard_S = torch.empty(bucket.shard_numel, device=self.device)
        _reduce_scatter_flat(shard_S, flat, op=dist.ReduceOp.SUM,
                                   group=group.process_group)
        return shard_S

    def _step_bucket(self, group: ShardedGroup, bucket: BucketLayout, grad_S: torch.Tensor,
                     lr: float) -> None:
        """AdamW on this rank's shard, then all-gather the shards back into the params."""
        param_S = torch.zeros(bucket.shard_numel, device=self.device)
        for piece in bucket.pieces(group.rank):
            param = group.params[piece.slot.index].detach().view(-1)
            param_S[piece.shard_start:piece.shard_start + piece.numel].copy_(
                param[piece.param_start:piece.param_start + piece.numel])
        adamw_update_(param_S, grad_S, group.exp_avg[bucket.index],
                      group.exp_avg_sq[bucket.index], lr=lr, step=self.step_count,
                      config=self.config, decay_ranges=bucket.decay_ranges(group.rank))
        flat = self._gather_bucket(group, bucket, param_S)
        for slot in bucket.slots:
            group.params[slot.index].detach().view(-1).copy_(flat[slot.offset:slot.end])

    def _gather_bucket(self, group: ShardedGroup, bucket: BucketLayout,
                       shard_S: torch.Tensor) -> torch.Tensor:
        """The whole flat bucket from every rank's shard of it."""
        if group.size == 1:
            return shard_S
        flat = torch.empty(bucket.padded_numel, device=self.device)
        _all_gather_flat(flat, shard_S, group=group.process_group)
        return flat

    def zero_grad(self) -> None:
        """Drop the gradients (set to None) so the next backward allocates fresh ones."""
        for group in self.groups:
            for param in group.params:
                param.grad = None

    # ------------------------------------------------------------------ state

    def state_bytes(self) -> int:
        """Bytes of AdamW moments held by this rank (about 1/N of the unsharded state)."""
        return sum(t.numel() * t.element_size()
                   for g in self.groups for t in (*g.exp_avg, *g.exp_avg_sq))

    @torch.no_grad()
    def full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every parameter's whole AdamW moments by name, gathered over its group.

        Checkpoints store this layout-free form, so a run saved with one dp / pp / ep
        loads into another: `load_full_state` takes each rank's slice again.
        """
        out: dict[str, dict[str, torch.Tensor]] = {}
        for group in self.groups:
            for bucket in group.buckets:
                for kind, shards in (("exp_avg", group.exp_avg), ("exp_avg_sq", group.exp_avg_sq)):
                    flat = self._gather_bucket(group, bucket, shards[bucket.index])
                    for slot in bucket.slots:
                        out.setdefault(slot.name, {})[kind] = \
                            flat[slot.offset:slot.end].view(slot.shape).clone()
        return out

    @torch.no_grad()
    def load_full_state(self, state: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        """Take this rank's shard of every parameter's moments from `full_state()` output."""
        for group in self.groups:
            for bucket in group.buckets:
                for piece in bucket.pieces(group.rank):
                    name = piece.slot.name
                    if name not in state:
                        raise KeyError(f"optimizer state has no moments for parameter {name!r}")
                    for kind, shards in (("exp_avg", group.exp_avg),
                                         ("exp_avg_sq", group.exp_avg_sq)):
                        full = state[name][kind].reshape(-1)
                        shards[bucket.index][piece.shard_start:piece.shard_start + piece.numel] \
                            .copy_(full[piece.param_start:piece.param_start + piece.numel])
        self.step_count = int(step)
