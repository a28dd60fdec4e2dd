"""Per-step model statistics reduced across ranks: ONE collective per step, all layers stacked.

Some statistics of a step must agree on every rank that holds the same layers (a stage's
data-parallel replicas) before the update:

    MoE router loads     [E] per MoE layer    SUM over replicas  -> balancing-bias update
    MLA max logit        [H] per attention    MAX over replicas  -> QK-Clip (MuonClip)

Both reduce over the same group, but with different operators, and a collective has one.
One all-reduce(SUM) carries both, exactly:

    float64 buffer, on every rank of the group (dp replicas, this is rank r):
    ┌────────────────────────────────┬──────────┬──────────┬─────┬──────────┐
    │ sums: loads of all MoE layers  │ slot 0   │ slot 1   │ ... │ slot dp-1│
    │ (this rank's own counts)       │ 0 ... 0  │ 0 ... 0  │     │ 0 ... 0  │  rank r writes its
    └────────────────────────────────┴──────────┴──────────┴─────┴──────────┘  maxima in slot r
                      │ all_reduce(SUM) over the group
                      v
      sums: the group's totals;  slot q: rank q's maxima exactly (x + 0 = x)  -> amax over slots

Exact, hence bitwise equal to one all-reduce per layer and to the single-process run: the
loads are integer counts (float64 holds them exactly, so any summation order gives the same
total), the maxima are fp32 values carried in float64 and summed only with zeros, and the
max over the slots is the MAX reduction. Known limit: the max part is `dp` times its size
(dp x attention layers of this stage x heads x 8 bytes; a K2.5 stage of 4 layers x 64 heads
is 2 KiB per replica, small beside one layer's loads): an all-reduce is still one
latency-bound message, unlike a per-layer collective per step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

Stats = dict[str, torch.Tensor]


def reduce_step_statistics(sums: Stats, maxima: Stats, group: dist.ProcessGroup | None
                           ) -> tuple[Stats, Stats]:
    """(``sums`` summed over ``group``, ``maxima`` maxed over it) in one all-reduce (see the
    module docstring), in the inputs' shapes and dtypes, same values on every rank. ``sums``
    must be integer-valued (counts) for the result to be exact. No collective without a
    group of several ranks (the single process runs the same packing)."""
    tensors = list(sums.values()) + list(maxima.values())
    if not tensors:
        return {}, {}
    device = tensors[0].device
    ranks = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    sum_numel = sum(t.numel() for t in sums.values())
    max_numel = sum(t.numel() for t in maxima.values())
    buffer = torch.zeros(sum_numel + ranks * max_numel, dtype=torch.float64, device=device)
    if sums:
        buffer[:sum_numel] = torch.cat([t.reshape(-1).to(torch.float64) for t in sums.values()])
    slots_RM = buffer[sum_numel:].view(ranks, max_numel)
    if maxima:
        slots_RM[rank] = torch.cat([t.reshape(-1).to(torch.float64) for t in maxima.values()])
    if ranks > 1:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    max_M = slots_RM.amax(dim=0)
    return (_unpack(buffer[:sum_numel], sums), _unpack(max_M, maxima))


def _unpack(flat: torch.Tensor, like: Stats) -> Stats:
    out, start = {}, 0
    for name, t in like.items():
        out[name] = flat[start:start + t.numel()].view(t.shape).to(t.dtype)
        start += t.numel()
    return out
