"""Worker: the all-to-all expert dispatcher equals the single-rank MoE, values and gradients.

Cases (each rank has a different, uneven number of tokens):
  ep = world with 2 experts per rank, one expert that receives no tokens at all;
  ep = number of experts (one expert per rank);
  ep = 1 (a group of one rank: no communication).
In every case the vectorised dispatcher also equals the previous one (a Python loop over
experts and source ranks, kept below as `LoopDispatcher`) bitwise: the same rows reach
each expert, and the same rows come back.
Rank 0 writes "ok <case>" lines to --out; any mismatch raises.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.distributed as dist

from model.config import preset
from model.init import initialize
from model.moe import MoE
from parallel.expert_dispatch import AllToAllDispatcher, all_to_all


class LoopDispatcher:
    """The dispatcher as it was before vectorisation (regroup built per expert and source)."""

    def __init__(self, group, num_experts):
        self.group, self.ep = group, dist.get_world_size(group)
        self.num_experts, self.local = num_experts, num_experts // self.ep

    def dispatch(self, x_TD, topk_idx_TK):
        T, K = topk_idx_TK.shape
        flat_expert = topk_idx_TK.reshape(-1)
        sort_order = torch.argsort(flat_expert, stable=True)
        x_sorted = x_TD[sort_order // K]
        counts_E = torch.bincount(flat_expert, minlength=self.num_experts)
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        recv_counts = recv_counts.view(self.ep, self.local)
        send_splits = counts_E.view(self.ep, self.local).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        x_recv = all_to_all(x_sorted, send_splits, recv_splits, self.group)
        starts = (torch.cumsum(recv_counts.reshape(-1), 0) - recv_counts.reshape(-1)).view(
            self.ep, self.local)
        blocks = [torch.arange(int(starts[src, e]), int(starts[src, e] + recv_counts[src, e]))
                  for e in range(self.local) for src in range(self.ep)]
        regroup = torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.long)
        self.saved = (sort_order, T, K, send_splits, recv_splits, regroup)
        return x_recv[regroup], recv_counts.sum(0).tolist()

    def combine(self, expert_out_ND):
        sort_order, T, K, send_splits, recv_splits, regroup = self.saved
        out_recv = torch.empty_like(expert_out_ND).index_copy(0, regroup, expert_out_ND)
        out_sorted = all_to_all(out_recv, recv_splits, send_splits, self.group)
        out = torch.empty_like(out_sorted).index_copy(0, sort_order, out_sorted)
        return out.view(T, K, -1)


def check_same_as_loop_dispatcher(name, group, num_experts, x_TD, topk_idx_TK):
    new, old = AllToAllDispatcher(group, num_experts), LoopDispatcher(group, num_experts)
    rows_new, per_expert_new, route = new.dispatch(x_TD, topk_idx_TK)
    rows_old, per_expert_old = old.dispatch(x_TD, topk_idx_TK)
    assert torch.equal(rows_new, rows_old) and per_expert_new.tolist() == per_expert_old, name
    expert_out = rows_new * 2.0 + 1.0  # any per-row function of the expert inputs
    back_new = new.combine(expert_out, route)
    back_old = old.combine(expert_out).reshape(-1, x_TD.shape[1])
    assert torch.equal(back_new, back_old[route.order]), f"{name}: combine differs"


def run_case(name: str, num_experts: int, group, ep_rank: int, ep: int, starve: int | None):
    cfg = dataclasses.replace(preset("tiny").lm, hidden=32, expert_hidden=16,
                              num_experts=num_experts, top_k=2)
    rank = dist.get_rank()
    per_rank = num_experts // ep
    reference = MoE(cfg)
    initialize(reference, seed=1)
    sharded = MoE(cfg, range(ep_rank * per_rank, (ep_rank + 1) * per_rank))
    initialize(sharded, seed=1)
    sharded.dispatcher = AllToAllDispatcher(group, num_experts)
    if starve is not None:  # the bias only steers selection: this expert is never chosen
        for moe in (reference, sharded):
            moe.router.bias[starve] = -100.0
    tokens = 3 + 5 * rank  # uneven over ranks
    x = torch.randn(1, tokens, cfg.hidden, generator=torch.Generator().manual_seed(100 + rank))
    with torch.no_grad():
        topk_idx, _ = reference.router.route(x.view(tokens, -1))
        check_same_as_loop_dispatcher(name, group, num_experts, x.view(tokens, -1), topk_idx)
    x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_ep = reference(x_ref), sharded(x_ep)
    torch.testing.assert_close(y_ep, y_ref, atol=1e-6, rtol=1e-5, msg=f"{name}: outputs")
    upstream = torch.randn_like(y_ref)
    y_ref.backward(upstream)
    y_ep.backward(upstream)
    torch.testing.assert_close(x_ep.grad, x_ref.grad, atol=1e-6, rtol=1e-5,
                               msg=f"{name}: input grads")
    # an expert's gradient collects the tokens of every rank of its EP group: sum the
    # reference gradients of all experts over the group (same order on every rank)
    summed = {}
    for proj in ("gate", "up", "down"):
        p_ref = getattr(reference.experts, proj)
        want = torch.zeros_like(p_ref) if p_ref.grad is None else p_ref.grad.clone()
        dist.all_reduce(want, group=group)
        summed[proj] = want  # [num_experts, ...]: every expert of the reference
    for i, e in enumerate(sharded.local_experts):
        for proj in ("gate", "up", "down"):
            p_ep = getattr(sharded.experts, proj)
            got = torch.zeros_like(p_ep[i]) if p_ep.grad is None else p_ep.grad[i]
            torch.testing.assert_close(got, summed[proj][e], atol=1e-6, rtol=1e-5,
                                       msg=f"{name}: expert {e} {proj} grad")
            if e == starve:
                assert float(got.abs().max()) == 0.0, f"{name}: starved expert got a gradient"
    load = sharded.expert_load.clone()
    if starve is not None:
        assert load[starve] == 0
    return f"ok {name}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    lines = [run_case("ep=world, 2 experts per rank, one starved expert", 2 * world,
                      dist.group.WORLD, rank, world, starve=3),
             run_case("ep = number of experts", world, dist.group.WORLD, rank, world, starve=None)]
    singles = [dist.new_group([r]) for r in range(world)]
    lines.append(run_case("ep=1", 8, singles[rank], 0, 1, starve=None))
    if rank == 0:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
