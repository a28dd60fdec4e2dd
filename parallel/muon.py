"""Muon as a ZeRO-1 update rule: momentum on the shard, Newton-Schulz on whole matrices.

Muon (Jordan et al.; Moonlight, "Muon is Scalable for LLM Training") updates a hidden
weight matrix W [A, B] with the orthogonalised momentum, scaled to AdamW's RMS:

    M      = M.lerp(G, 1 - mu)                         momentum, elementwise (the shard)
    U      = G.lerp(M, mu)                             Nesterov, elementwise (the shard)
    O      = NewtonSchulz5(U)                          needs the WHOLE matrix
    W     *= 1 - lr * weight_decay                     decoupled decay
    W     -= lr * 0.2 * sqrt(max(A, B)) * O            "match_rms_adamw"

The operations and their order copy `torch.optim.Muon` (torch 2.13, nesterov, with
``adjust_lr_fn="match_rms_adamw"``), so one process equals it to the rounding of the
Newton-Schulz dtype. An expert's weights are their own matrix: a 3-D parameter
``[E, out, in]`` (grouped experts) is a batch of E matrices, and matrices of one shape
run through ONE batched Newton-Schulz (``baddbmm``), whatever parameter they belong to.

Distributed (ZeRO-1 shards a flat bucket; a matrix may straddle shard boundaries)::

    bucket      | W0 (whole on r0) | W1 ............ | W2 [E, a, b] .................. |
    shards      [ rank 0          ][ rank 1          ][ rank 2          ][ rank 3      ]
    1. each rank: momentum and U on its own shard (elementwise, no communication)
    2. all_gather(U_shard) -> U of the whole bucket on every rank   (ONE collective)
    3. each rank: Newton-Schulz of the matrices its shard overlaps (W1: ranks 0 and 1;
       of W2 only the experts whose elements lie in the shard)
    4. each rank: its slice of O into its master shard; ZeRO-1 all-gathers the params

Why gather the bucket rather than route each matrix to one owner (Moonlight's gather
per matrix, or an owner rank with a gather + scatter): the bucket all-gather is the
collective ZeRO-1 already has (one call, in-place friendly, the same on gloo and NCCL,
no uneven all-to-all), and it keeps every rank's writes local, so no scatter of O back.
Its cost, per step and per bucket: every rank receives the whole bucket's U (in the
Newton-Schulz dtype: bf16 on GPU, i.e. the volume of the parameter all-gather again;
fp32 on CPU), holds it transiently (one bucket, <= bucket_numel elements), and
computes Newton-Schulz for about 1/N of the bucket's matrices plus at most the two it
shares with its neighbours (a matrix cut by a shard boundary is computed by every rank
it overlaps; each element is still written by exactly one rank, its owner). Known limit: a
single matrix larger than a shard (a big embedding-sized matrix over many ranks) is
computed redundantly by every rank it overlaps; an owner-per-matrix routing would
remove that redundancy and the all-gather volume (~N x less traffic) at the price of
an uneven all-to-all.

Elements of padding are never read or written. Known limit: the per-step Python loop
runs over this shard's parameter pieces (one slice per piece), so per-expert 2-D
parameters (the per-expert modules) cost a loop per expert; grouped [E, out, in]
parameters cost one piece each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from parallel.update_rule import BucketShard
from parallel.zero1 import ParamGroup

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@dataclass(frozen=True)
class MuonConfig:
    """Muon's fixed hyper-parameters (the learning rate comes per step, as for AdamW).

    ``ns_dtype``: the Newton-Schulz dtype; None picks bf16 on CUDA (what Muon is tuned
    for, and `torch.optim.Muon` always uses) and fp32 elsewhere (CPU runs are the fp32
    correctness reference, and bf16 matmuls are slow on CPU).
    """

    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS
    eps: float = 1e-7
    weight_decay: float = 0.0
    ns_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"Muon momentum must lie in [0, 1), got {self.momentum}")
        if not 1 <= self.ns_steps < 100:
            raise ValueError(f"Muon ns_steps must lie in [1, 100), got {self.ns_steps}")
        if len(self.ns_coefficients) != 3:
            raise ValueError(f"Muon ns_coefficients must be 3 numbers (a, b, c), got "
                             f"{self.ns_coefficients}")
        if self.weight_decay < 0.0:
            raise ValueError(f"Muon weight_decay must be >= 0, got {self.weight_decay}")
        if self.ns_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"Muon ns_dtype {self.ns_dtype}: choose None, torch.float32 or "
                             f"torch.bfloat16")

    def dtype_on(self, device: torch.device) -> torch.dtype:
        if self.ns_dtype is not None:
            return self.ns_dtype
        return torch.bfloat16 if device.type == "cuda" else torch.float32


def rms_matching_scale(rows: int, cols: int) -> float:
    """Moonlight's 0.2 * sqrt(max(A, B)): the update's RMS matches AdamW's (~0.2)."""
    return 0.2 * math.sqrt(max(rows, cols))


def newton_schulz(u_BMN: torch.Tensor, config: MuonConfig, dtype: torch.dtype) -> torch.Tensor:
    """Approximate orthogonalisation of each matrix of a batch (torch.optim.Muon's
    quintic iteration, batched): ``[batch, M, N]`` in, the same shape in ``dtype`` out."""
    if u_BMN.dim() != 3:
        raise ValueError(f"newton_schulz takes a batch of matrices [B, M, N], got "
                         f"{tuple(u_BMN.shape)}")
    a, b, c = config.ns_coefficients
    x = u_BMN.to(dtype)
    tall = x.shape[1] > x.shape[2]
    if tall:
        x = x.mT
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=config.eps)  # spectral norm <= 1
    for _ in range(config.ns_steps):
        gram = x @ x.mT
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x.mT if tall else x


@dataclass(frozen=True)
class _Write:
    """A piece of this shard: where its slice of the orthogonalised update comes from."""

    batch: int  # which shape batch
    source: int  # first element in that batch's flat output
    shard_start: int
    shard_end: int
    lr_scale: float  # rms_matching_scale of the matrix shape


@dataclass
class MuonPlan:
    """What `Muon.update` needs from the layout (computed once per bucket)."""

    # per matrix shape (M, N): runs (bucket_start, count) of whole matrices in the bucket
    batches: list[tuple[tuple[int, int], list[tuple[int, int]]]]
    writes: list[_Write]
    decay_ranges: list[tuple[int, int]]
    clip: Any = field(default=None)  # QKClip.prepare(shard) when QK-Clip is on


def matrix_shape(name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(count, M, N): a 2-D parameter is one matrix, a 3-D one [E, M, N] E matrices."""
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    raise ValueError(f"Muon steps matrices; {name!r} has shape {shape}: give parameters "
                     f"that are not 2-D (or grouped 3-D experts) to AdamW")


class Muon:
    """The `UpdateRule` for Muon (one state, ``momentum``); every slot must be a matrix
    or a batch of matrices. ``clip`` (parallel/qk_clip.py) rescales attention rows after
    the update: together they are MuonClip."""

    state_names = ("momentum",)

    def __init__(self, config: MuonConfig = MuonConfig(), clip: Any = None):
        self.config = config
        self.clip = clip

    def prepare(self, shard: BucketShard) -> MuonPlan:
        shape_index: dict[tuple[int, int], int] = {}
        batches: list[tuple[tuple[int, int], list[tuple[int, int]]]] = []
        filled: list[int] = []  # elements queued per batch so far
        writes = []
        for piece in shard.pieces:
            slot = piece.slot
            _, rows, cols = matrix_shape(slot.name, slot.shape)
            mn = rows * cols
            first = piece.param_start // mn
            last = (piece.param_start + piece.numel - 1) // mn
            b = shape_index.setdefault((rows, cols), len(batches))
            if b == len(batches):
                batches.append(((rows, cols), []))
                filled.append(0)
            source = filled[b] + piece.param_start - first * mn
            batches[b][1].append((slot.offset + first * mn, last - first + 1))
            filled[b] += (last - first + 1) * mn
            writes.append(_Write(b, source, piece.shard_start, piece.shard_end,
                                 rms_matching_scale(rows, cols)))
        plan = MuonPlan(batches, writes, shard.layout.decay_ranges(shard.rank))
        if self.clip is not None:
            plan.clip = self.clip.prepare(shard)
        return plan

    def update(self, shard: BucketShard, grad_S: torch.Tensor, *, lr: float, step: int) -> None:
        del step  # Muon has no bias correction
        config, plan = self.config, shard.plan
        momentum_S = shard.state["momentum"]
        momentum_S.lerp_(grad_S, 1.0 - config.momentum)
        update_S = grad_S.lerp(momentum_S, config.momentum) if config.nesterov else momentum_S
        dtype = config.dtype_on(update_S.device)
        # the cast before the gather gives the bits NS would see anyway, at less traffic
        whole = shard.all_gather(update_S.to(dtype))
        outputs = []
        for (rows, cols), runs in plan.batches:
            u = torch.cat([whole[start:start + count * rows * cols] for start, count in runs])
            outputs.append(newton_schulz(u.view(-1, rows, cols), config, dtype).reshape(-1))
        if config.weight_decay != 0.0:
            keep = 1.0 - lr * config.weight_decay
            for start, end in plan.decay_ranges:
                shard.master[start:end].mul_(keep)
        for w in plan.writes:
            shard.master[w.shard_start:w.shard_end].add_(
                outputs[w.batch][w.source:w.source + w.shard_end - w.shard_start],
                alpha=-lr * w.lr_scale)
        if self.clip is not None:
            self.clip.apply_(shard, plan.clip)


def uses_muon(name: str, param: torch.Tensor) -> bool:
    """Muon for the hidden matrices: 2-D weights and grouped 3-D expert weights; AdamW for
    the embedding table, the output head, norms, biases and other tensors (e.g. the
    vision position-embedding grid)."""
    if name.split(".")[-2:-1] in (["embed"], ["head"]):
        return False
    return param.dim() == 2 or (param.dim() == 3 and ".experts." in name)


def muon_param_groups(named: list[tuple[str, torch.nn.Parameter]], process_group,
                      muon: Muon | None) -> list[ParamGroup]:
    """ZeRO-1 param groups of one process group: all in one (the optimizer's rule) without
    Muon; else the Muon matrices and the rest (the optimizer's rule) as two groups, so
    each element holds only its own rule's state."""
    def group(items, rule=None):
        return ParamGroup([p for _, p in items], process_group, [n for n, _ in items], rule)

    if muon is None:
        return [group(named)] if named else []
    matrices = [(n, p) for n, p in named if uses_muon(n, p)]
    rest = [(n, p) for n, p in named if not uses_muon(n, p)]
    return [g for g in (group(matrices, muon) if matrices else None,
                        group(rest) if rest else None) if g is not None]
