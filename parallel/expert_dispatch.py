"""Expert-parallel token dispatch: dropless all-to-all with uneven splits.

Experts are split evenly over the `ep` ranks of an expert-parallel group (rank
r holds global experts [r*E/ep, (r+1)*E/ep)). Each rank routes its own tokens;
the (token, k) pairs travel to the rank of their expert and back:

    dispatch:  sort pairs by global expert ──> contiguous block per destination rank
               all_to_all(counts per expert)        (everyone learns what it will receive)
               all_to_all(tokens, uneven splits)    received in (source rank, local expert) order
               regroup to (local expert, source rank) so each expert sees one contiguous block
               (a stable argsort by expert: vectorised, no loop over experts or sources)
    experts:   this rank's experts run on their blocks (grouped GEMM)
    combine:   undo the regrouping, all_to_all back  ──> this rank's pairs in expert order;
               the MoE layer scatters them into their tokens

Host syncs: one per dispatch (the split sizes of the token all-to-all, read together).

Nothing is dropped and nothing is padded: an expert that receives no tokens
gets an empty block. Gradients take the reverse route (the backward of an
all-to-all is the all-to-all with the splits swapped). With ep = 1 no
communication happens and the result equals `model.dispatcher.LocalDispatcher`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.dispatcher import Route, sort_by_expert
from model.saved_tensors import inside_region


def refuse_inside_recompute() -> None:
    """Communication is never recomputed: a memory policy's recomputed region runs twice
    (forward, then again in the backward), and an all-to-all in it would run twice on this
    rank but not on its peers' schedule. The policy's region list cannot express that; this
    catches code that would."""
    region = inside_region()
    if region is not None:
        raise RuntimeError(f"an expert all-to-all runs inside the recomputed region {region!r}: "
                           "recomputed regions must stay between collectives (drop it from "
                           "memory.recompute)")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits whose backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x_ND, send_splits: list[int], recv_splits: list[int], group):
        refuse_inside_recompute()
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x_ND.new_empty((sum(recv_splits),) + tuple(x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), output_split_sizes=recv_splits,
                               input_split_sizes=send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.send_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), output_split_sizes=ctx.send_splits,
                               input_split_sizes=ctx.recv_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x_ND, send_splits, recv_splits, group):
    return _AllToAll.apply(x_ND, send_splits, recv_splits, group)


class PendingAllToAll:
    """An all-to-all in flight (gloo: its worker thread; NCCL: its stream); `wait()` gives
    the received rows. Not an autograd op: node-by-node runners send gradients back with
    another `all_to_all_start` with the splits swapped."""

    def __init__(self, x_ND, send_splits: list[int], recv_splits: list[int], group):
        refuse_inside_recompute()
        self.out = x_ND.new_empty((sum(recv_splits),) + tuple(x_ND.shape[1:]))
        self._send = x_ND.detach().contiguous()  # alive until the transfer is done
        self.work = dist.all_to_all_single(self.out, self._send, output_split_sizes=recv_splits,
                                           input_split_sizes=send_splits, group=group,
                                           async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        self._send = None
        return self.out


def all_to_all_start(x_ND, send_splits, recv_splits, group) -> PendingAllToAll:
    """Start an all-to-all; the caller computes something else and `wait()`s for the rows."""
    return PendingAllToAll(x_ND, send_splits, recv_splits, group)


@dataclass
class _EPRoute(Route):
    regroup: torch.Tensor | None = None  # received row feeding each row of the expert block


class AllToAllDispatcher:
    """`group`: the expert-parallel ranks the tokens travel between; `meta_group`: the same
    ranks, another communicator, for the per-expert counts, so that exchanging counts never
    queues behind a token all-to-all that is still in flight (the overlapped schedule)."""

    def __init__(self, group, num_experts: int, meta_group=None):
        self.group = group
        self.meta_group = group if meta_group is None else meta_group
        self.ep = dist.get_world_size(group)
        if num_experts % self.ep:
            raise ValueError(f"{num_experts} experts do not split over {self.ep} expert ranks")
        self.num_experts = num_experts
        self.local = num_experts // self.ep

    def prepare(self, x_TD, topk_idx_TK):
        refuse_inside_recompute()  # the count exchange below is a collective
        x_sorted, order, counts_E = sort_by_expert(x_TD, topk_idx_TK, self.num_experts)
        if self.ep == 1:
            recv_counts = counts_E
        else:
            recv_counts = torch.empty_like(counts_E)
            dist.all_to_all_single(recv_counts, counts_E, group=self.meta_group)
        recv_counts_SE = recv_counts.view(self.ep, self.local)  # [source rank, local expert]
        splits = torch.cat([counts_E.view(self.ep, self.local).sum(1), recv_counts_SE.sum(1)])
        splits = splits.tolist()  # the one host sync
        send_splits, recv_splits = splits[:self.ep], splits[self.ep:]
        # received order is (source, expert); the experts want (expert, source)
        expert_of_row = torch.arange(self.local, device=x_TD.device).repeat(self.ep)
        expert_of_row = expert_of_row.repeat_interleave(recv_counts, output_size=sum(recv_splits))
        regroup = torch.argsort(expert_of_row, stable=True)
        travels = self.ep > 1
        route = _EPRoute(order, topk_idx_TK.shape[1], recv_counts_SE.sum(0),
                         send_splits if travels else None, recv_splits if travels else None,
                         regroup)
        return x_sorted, route

    def regroup(self, x_recv_ND, route: _EPRoute):
        return x_recv_ND[route.regroup]

    def ungroup(self, expert_out_ND, route: _EPRoute):
        return torch.empty_like(expert_out_ND).index_copy(0, route.regroup, expert_out_ND)

    def dispatch(self, x_TD, topk_idx_TK):
        x_sorted, route = self.prepare(x_TD, topk_idx_TK)
        x_recv = (x_sorted if route.send_splits is None else
                  all_to_all(x_sorted, route.send_splits, route.recv_splits, self.group))
        return self.regroup(x_recv, route), route.rows_per_expert, route

    def combine(self, expert_out_ND, route: _EPRoute):
        out_recv = self.ungroup(expert_out_ND, route)
        if route.send_splits is None:
            return out_recv
        return all_to_all(out_recv, route.recv_splits, route.send_splits, self.group)
