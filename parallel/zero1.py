"""ZeRO-1: persistent flat buffers, optimizer state and master weights sharded per group.

Every rank of a group holds the full parameters (in the compute dtype) and computes
full local gradients; each rank keeps fp32 master weights and optimizer state only
for its 1/N contiguous slice of every bucket. Parameters and gradients are views
into one flat buffer per group, so nothing is copied in or out per step::

    group buffers (persistent)      | bucket 0           | bucket 1           | ...
      params  (fp32 | bf16)         [ p0 | p1 | pad    ][ p2          | pad ]   params are views
      grads   (fp32, summed)        [ g0 | g1 | pad    ][ g2          | pad ]   .grad (fp32) or
                                                                                main grad (bf16)
    this rank's shards (rank r of N: [r*S, (r+1)*S) of each bucket)
      master  (fp32)                = the params' own shard in fp32; a separate fp32 copy with bf16
      state   (fp32, per rule)      e.g. exp_avg, exp_avg_sq

One step, per group::

    backward   gradient hooks: fp32 grads accumulate in place in the buffer; bf16 grads
               are added into the fp32 buffer and dropped. When the LAST backward of the
               step that touches a parameter has run (the engine says which one, see
               `last_backward`), the parameter is final; a bucket whose parameters are
               all final starts its reduce_scatter(SUM) asynchronously, in place, while
               the backward goes on (buckets launch in descending index order, the order
               the backward completes them, identical on every rank of the group)
    step       wait for the remaining buckets -> global grad norm -> clip -> rule.update
               on each shard (master and state) -> cast the shard into the param buffer
               -> all_gather in place (asynchronous, waited at the end of the step)

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

fp32 contract: with fp32 parameters the numbers are bitwise those of the previous
(copying) implementation and of an unsharded `torch.optim.AdamW` fed the same summed
gradients: the bucket packing (parallel/bucket_layout.py) is unchanged, the in-place
reduce-scatter and all-gather give the same bits as out-of-place ones, the AdamW math
is elementwise, and the norm is summed in float64 in the same bucket order.

Mixed precision (``param_dtype=torch.bfloat16``): the parameters arrive in fp32 (their
initial values become the masters), then become bf16 views of the param buffer. Known
limits: fp16 is refused (it would need loss scaling); a parameter's gradient must not
be replaced or set to None by other code between backward and `step` (checked).

Update rules are pluggable (parallel/update_rule.py): ZeRO-1 hands each rule a
`BucketShard` (layout, pieces, master, named state, a group all-gather), so a matrix
optimizer such as Muon plugs in without touching the buffers or the collectives.

Weight decay: decided per parameter by ``decay_rule(name, param)``; the default decays
matrices and higher (ndim >= 2) and leaves biases and norm scales alone.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from parallel.adamw import AdamW
from parallel.bucket_layout import BucketLayout, ShardPiece, plan_buckets
from parallel.flat_chunks import FlatChunks
from parallel.update_rule import BucketShard, UpdateRule, all_gather_flat, reduce_scatter_flat

DEFAULT_BUCKET_NUMEL = 40_000_000
PARAM_DTYPES = (torch.float32, torch.bfloat16)

DecayRule = Callable[[str, torch.Tensor], bool]


def decay_matrices_only(name: str, param: torch.Tensor) -> bool:
    """Default weight-decay rule: decay weights of rank >= 2, not biases or norm scales."""
    del name
    return param.dim() >= 2


@dataclass
class ParamGroup:
    """Parameters sharded together over ``process_group`` (``None``: a world of one).

    Every rank of ``process_group`` must pass the same parameters (shapes, order).
    ``names`` name the parameters in checkpoints and error messages; default ``"p<i>"``.
    ``rule`` steps this group (default: the optimizer's rule); MuonClip puts the hidden
    matrices (Muon, state "momentum") and the rest (AdamW) of one process group into two
    groups, so each element carries only its own rule's state.
    """

    params: list[nn.Parameter]
    process_group: dist.ProcessGroup | None
    names: list[str] | None = None
    rule: UpdateRule | None = None


@dataclass
class ShardedGroup:
    """One param group as this rank sees it: layout, flat buffers, shards, step progress."""

    params: list[nn.Parameter]
    names: list[str]
    process_group: dist.ProcessGroup | None
    rule: UpdateRule
    rank: int  # this rank's index inside process_group (0 for a world of one)
    size: int
    buckets: list[BucketLayout]
    bucket_base: list[int]  # first element of each bucket in the flat buffers
    params_flat: torch.Tensor  # compute dtype; the parameters are views into it
    grads_flat: torch.Tensor  # fp32; summed gradients (this rank's shard after the reduce)
    shards: list[BucketShard]  # one per bucket: what the update rule sees
    bucket_of: list[int]  # bucket of each parameter
    # parameter index -> its (piece, shard) on this rank, for checkpoints
    pieces_of: list[list[tuple[ShardPiece, BucketShard]]]
    master_flat: torch.Tensor | None = None  # fp32 masters of all shards (bf16 only)
    state_flat: dict[str, torch.Tensor] = field(default_factory=dict)
    # progress of the current step
    final: list[bool] = field(default_factory=list)  # no more gradient this step
    armed: list[bool] = field(default_factory=list)  # inside its last backward
    pending: list[int] = field(default_factory=list)  # non-final params per bucket
    next_launch: int = -1  # buckets launch in descending order; the next one to go
    handles: list[dist.Work | None] = field(default_factory=list)

    def bucket_view(self, flat: torch.Tensor, b: int) -> torch.Tensor:
        base = self.bucket_base[b]
        return flat[base:base + self.buckets[b].padded_numel]

    def grad_shard(self, b: int) -> torch.Tensor:
        start, end = self.buckets[b].shard_range(self.rank)
        return self.bucket_view(self.grads_flat, b)[start:end]


class Zero1Optimizer:
    """ZeRO-1 over several param groups with one global clip and a pluggable update rule.

    ``step(lr)`` finishes the gradient reduce-scatters, computes the global grad norm
    over ``norm_group``, clips (``max_grad_norm <= 0`` disables), updates each shard
    with ``rule`` and all-gathers the parameters; it returns the pre-clip norm as a 0-d
    fp32 tensor. A parameter that received no gradient counts as a zero gradient (all
    ranks of its group still take part in the collectives).

    Collectives of one group run in one order on all its ranks (buckets in descending
    index order). ``norm_group`` may be None only in a single-process job.
    """

    def __init__(self, param_groups: Sequence[ParamGroup | tuple], *,
                 norm_group: dist.ProcessGroup | None,
                 rule: UpdateRule | None = None,
                 max_grad_norm: float = 1.0,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL,
                 decay_rule: DecayRule = decay_matrices_only,
                 param_dtype: torch.dtype = torch.float32,
                 overlap_grad_reduce: bool = True) -> None:
        if param_dtype not in PARAM_DTYPES:
            raise ValueError(f"ZeRO-1 param_dtype {param_dtype} is not supported; choose "
                             f"torch.float32 or torch.bfloat16 (fp16 would need loss scaling)")
        self.rule = rule if rule is not None else AdamW()
        self.max_grad_norm = float(max_grad_norm)
        self.norm_group = norm_group
        self.param_dtype = param_dtype
        self.mixed = param_dtype != torch.float32
        self.overlap_grad_reduce = overlap_grad_reduce
        self.step_count = 0
        groups = [g if isinstance(g, ParamGroup) else ParamGroup(*g) for g in param_groups]
        self._check_params(groups)
        self.device = groups[0].params[0].device if groups and groups[0].params else \
            torch.device("cpu")
        if norm_group is None and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            raise ValueError("norm_group is None in a job of more than one rank; pass the world "
                             "group as norm_group so the grad norm covers every rank's shard")
        self.groups: list[ShardedGroup] = []
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (group, param index)
        for group_index, group in enumerate(groups):
            self.groups.append(self._build_group(group_index, group, bucket_numel, decay_rule))
        names = [n for g in self.groups for n in g.names]
        if len(set(names)) != len(names):
            raise ValueError("ZeRO-1 parameter names must be unique (checkpoints store state by "
                             "name); pass distinct names")
        self._full_weights: dict[str, torch.Tensor] = {}  # checkpoint load in progress
        self._new_step()

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
                    raise ValueError(f"ZeRO-1 takes fp32 params (their values become the fp32 "
                                     f"masters; param_dtype sets the compute dtype); {where} is "
                                     f"{param.dtype}: build the model in fp32")
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

    @torch.no_grad()
    def _build_group(self, group_index: int, group: ParamGroup, bucket_numel: int,
                     decay_rule: DecayRule) -> ShardedGroup:
        names = group.names or [f"p{i}" for i in range(len(group.params))]
        rule = group.rule if group.rule is not None else self.rule
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
        bases, shard_bases, total, shard_total = [], [], 0, 0
        for bucket in buckets:
            bases.append(total)
            shard_bases.append(shard_total)
            total += bucket.padded_numel
            shard_total += bucket.shard_numel
        device = self.device
        params_flat = torch.zeros(total, dtype=self.param_dtype, device=device)
        grads_flat = torch.zeros(total, dtype=torch.float32, device=device)
        master_flat = torch.zeros(shard_total, device=device) if self.mixed else None
        state_flat = {name: torch.zeros(shard_total, device=device)
                      for name in rule.state_names}
        shards, bucket_of = [], [0] * len(group.params)
        pieces_of: list[list[tuple[ShardPiece, BucketShard]]] = [[] for _ in group.params]
        for b, bucket in enumerate(buckets):
            start, end = bucket.shard_range(rank)
            s0, s1 = shard_bases[b], shard_bases[b] + bucket.shard_numel
            master = (master_flat[s0:s1] if self.mixed
                      else params_flat[bases[b] + start:bases[b] + end])
            shard = BucketShard(bucket, rank, size, pg, tuple(bucket.pieces(rank)), master,
                                {name: t[s0:s1] for name, t in state_flat.items()})
            shard.plan = rule.prepare(shard)
            shards.append(shard)
            for piece in shard.pieces:
                pieces_of[piece.slot.index].append((piece, shard))
                param = group.params[piece.slot.index].detach().reshape(-1)
                master[piece.shard_start:piece.shard_end].copy_(
                    param[piece.param_start:piece.param_start + piece.numel])
        sharded = ShardedGroup(list(group.params), names, pg, rule, rank, size, buckets, bases,
                               params_flat, grads_flat, shards, bucket_of, pieces_of,
                               master_flat, state_flat)
        for bucket in buckets:
            for slot in bucket.slots:
                param = group.params[slot.index]
                bucket_of[slot.index] = bucket.index
                start, end = bases[bucket.index] + slot.offset, bases[bucket.index] + slot.end
                view = params_flat[start:end].view(slot.shape)
                view.copy_(param.detach())
                param.data = view
                grad_view = grads_flat[start:end].view(slot.shape)
                if not self.mixed:
                    param.grad = grad_view  # autograd accumulates into the buffer in place
                param.register_post_accumulate_grad_hook(
                    self._grad_hook(sharded, group_index, slot.index, grad_view))
                self._where[id(param)] = (group_index, slot.index)
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
        all_gather_flat(everyone, mine, group=pg)
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

    # ------------------------------------------------------------------ the backward

    def _grad_hook(self, group: ShardedGroup, group_index: int, index: int,
                   grad_view: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if group.final[index]:
                raise RuntimeError(
                    f"a gradient of {group.names[index]!r} arrived after its last backward of "
                    f"the step (its bucket's reduce-scatter may have started): declare the last "
                    f"backward that touches a parameter with Zero1Optimizer.last_backward")
            if self.mixed:  # accumulate in fp32, drop the low-precision gradient
                grad_view.add_(param.grad)
                param.grad = None
            if group.armed[index]:
                self._mark_final(group, index)
        return hook

    @contextmanager
    def last_backward(self, params: Iterable[torch.Tensor]) -> Iterator[None]:
        """Run the step's LAST backward that touches ``params`` inside this context.

        Their gradient hooks then mark them final, and a bucket whose parameters are all
        final starts its reduce-scatter while the backward continues; parameters the
        backward did not reach (e.g. an expert without tokens) become final when the
        context exits. Without the context (or with overlap off) everything is reduced
        in `step`. With pipeline parallelism a chunk's parameters accumulate over several
        microbatches: only the chunk's last backward of the step belongs in here.
        """
        where = []
        for param in params:
            if id(param) not in self._where:
                raise ValueError(f"last_backward got a tensor of shape {tuple(param.shape)} "
                                 f"that is not a parameter of this optimizer")
            where.append(self._where[id(param)])
        if not self.overlap_grad_reduce:
            yield
            return
        for g, i in where:
            self.groups[g].armed[i] = True
        yield  # an exception propagates without launching collectives other ranks may skip
        for g, i in where:
            group = self.groups[g]
            group.armed[i] = False
            self._mark_final(group, i)

    def _mark_final(self, group: ShardedGroup, index: int) -> None:
        if group.final[index]:
            return
        group.final[index] = True
        group.pending[group.bucket_of[index]] -= 1
        while group.next_launch >= 0 and group.pending[group.next_launch] == 0:
            self._launch_reduce_scatter(group, group.next_launch)
            group.next_launch -= 1

    def _launch_reduce_scatter(self, group: ShardedGroup, b: int) -> None:
        """Start bucket ``b``'s reduce-scatter(SUM), in place: its shard of the gradient
        buffer becomes the group's summed gradient once the handle completes."""
        if group.size == 1:
            return
        flat = group.bucket_view(group.grads_flat, b)
        group.handles[b] = reduce_scatter_flat(group.grad_shard(b), flat, op=dist.ReduceOp.SUM,
                                               group=group.process_group, async_op=True)

    def _wait_reduce_scatter(self, group: ShardedGroup, b: int) -> torch.Tensor:
        """Bucket ``b``'s summed gradient shard, after its reduce-scatter completed."""
        handle = group.handles[b]
        if handle is not None:
            handle.wait()
            group.handles[b] = None
        return group.grad_shard(b)

    def _new_step(self) -> None:
        for group in self.groups:
            group.final = [False] * len(group.params)
            group.armed = [False] * len(group.params)
            group.pending = [len(bucket.slots) for bucket in group.buckets]
            group.next_launch = len(group.buckets) - 1
            group.handles = [None] * len(group.buckets)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, lr: float) -> torch.Tensor:
        if not self.mixed:
            self._check_grad_views()
        for group in self.groups:  # buckets no declared last backward has completed
            while group.next_launch >= 0:
                self._launch_reduce_scatter(group, group.next_launch)
                group.next_launch -= 1
        grad_shards = [[self._wait_reduce_scatter(g, b) for b in range(len(g.buckets))]
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
        gathers = []
        for group, shards in zip(self.groups, grad_shards):
            for b, grad_S in enumerate(shards):
                group.rule.update(group.shards[b], grad_S, lr=lr, step=self.step_count)
                gathers.append(self._gather_params(group, b))
        for handle in gathers:
            if handle is not None:
                handle.wait()
        self._new_step()
        return total_norm

    def _gather_params(self, group: ShardedGroup, b: int) -> dist.Work | None:
        """Cast the updated master shard into the param buffer; start the in-place
        all-gather that brings every rank's shard into everyone's parameters."""
        shard = group.shards[b]
        flat = group.bucket_view(group.params_flat, b)
        start, end = group.buckets[b].shard_range(group.rank)
        if self.mixed:
            flat[start:end].copy_(shard.master)
        if group.size == 1:
            return None
        return all_gather_flat(flat, flat[start:end], group=group.process_group, async_op=True)

    def _check_grad_views(self) -> None:
        for group in self.groups:
            for bucket in group.buckets:
                base = group.bucket_base[bucket.index]
                for slot in bucket.slots:
                    grad = group.params[slot.index].grad
                    if grad is None or grad.data_ptr() != \
                            group.grads_flat[base + slot.offset:].data_ptr():
                        raise RuntimeError(
                            f"the gradient of {slot.name!r} is no longer its view of the ZeRO-1 "
                            f"gradient buffer (something set .grad or ran backward with "
                            f"create_graph=True); use Zero1Optimizer.zero_grad() and plain "
                            f"backward()")

    def zero_grad(self) -> None:
        """Zero the gradient buffers (the parameters keep their views into them)."""
        for group in self.groups:
            if any(handle is not None for handle in group.handles):
                raise RuntimeError("zero_grad while a gradient reduce-scatter is in flight: "
                                   "call step() first")
            group.grads_flat.zero_()
        self._new_step()

    # ------------------------------------------------------------------ state

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (about 1/N of the unsharded state)."""
        return sum(t.numel() * t.element_size()
                   for g in self.groups for t in g.state_flat.values())

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the parameters, by role (fp32 masters are the params'
        own shards unless the compute dtype is lower: then they are counted separately)."""
        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)
        return {"weights": nbytes(g.params_flat for g in self.groups),
                "grads": nbytes(g.grads_flat for g in self.groups),
                "master": nbytes(g.master_flat for g in self.groups if g.master_flat is not None),
                "state": self.state_bytes()}

    def state_pieces(self) -> dict[str, dict[str, FlatChunks]]:
        """This rank's pieces of every parameter's optimizer state, by parameter name, as
        1-D entries of the parameter's numel (see parallel/flat_chunks.py); with a
        compute dtype below fp32 also ``"master"``, the fp32 weights. Views: saving and
        loading read and write the shards themselves."""
        out: dict[str, dict[str, FlatChunks]] = {}
        for group in self.groups:
            kinds = list(group.rule.state_names) + (["master"] if self.mixed else [])
            for index, pieces in enumerate(group.pieces_of):
                if not pieces:
                    continue
                numel = group.params[index].numel()
                out[group.names[index]] = {
                    kind: FlatChunks(numel, [
                        (piece.param_start,
                         (shard.master if kind == "master" else shard.state[kind])
                         [piece.shard_start:piece.shard_end]) for piece, shard in pieces])
                    for kind in kinds}
        return out

    def load_targets(self, has_master: Callable[[str], bool]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, FlatChunks]]]:
        """Where a checkpoint load writes: (weights by name, state pieces by name).

        A parameter whose checkpoint holds fp32 masters (``has_master(name)``, saved by a
        bf16 run) is read from them, piece by piece, into this rank's masters; otherwise
        from its full weights: straight into the parameter in fp32, into a temporary fp32
        copy with bf16 (`finish_load` takes the pieces; a known cost when switching an
        fp32 checkpoint to bf16: one whole fp32 parameter set per rank, transiently).
        Call `finish_load` after the read.
        """
        state = self.state_pieces()
        weights: dict[str, torch.Tensor] = {}
        self._full_weights = {}
        for group in self.groups:
            for index, (name, param) in enumerate(zip(group.names, group.params)):
                if has_master(name):
                    if not self.mixed and group.pieces_of[index]:
                        state.setdefault(name, {})["master"] = FlatChunks(param.numel(), [
                            (piece.param_start, shard.master[piece.shard_start:piece.shard_end])
                            for piece, shard in group.pieces_of[index]])
                elif self.mixed:
                    self._full_weights[name] = weights[name] = torch.empty(
                        param.shape, dtype=torch.float32, device=self.device)
                    state.get(name, {}).pop("master", None)
                else:
                    weights[name] = param.detach()
        return weights, state

    @torch.no_grad()
    def finish_load(self, step: int) -> None:
        """After a checkpoint read into `load_targets`: masters from full weights where
        needed, then the parameters from the masters (cast, all-gathered); the step."""
        for group in self.groups:
            for index, name in enumerate(group.names):
                full = self._full_weights.get(name)
                if full is None:
                    continue
                flat = full.reshape(-1)
                for piece, shard in group.pieces_of[index]:
                    shard.master[piece.shard_start:piece.shard_end].copy_(
                        flat[piece.param_start:piece.param_start + piece.numel])
        self._full_weights = {}
        handles = [self._gather_params(g, b) for g in self.groups for b in range(len(g.buckets))]
        for handle in handles:
            if handle is not None:
                handle.wait()
        self.step_count = int(step)
