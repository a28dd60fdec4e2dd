"""Worker: the all-to-all expert dispatcher equals the single-rank MoE, values and gradients.

Cases (each rank has a different, uneven number of tokens):
  ep = world with 2 experts per rank, one expert that receives no tokens at all;
  ep = number of experts (one expert per rank);
  ep = 1 (a group of one rank: no communication).
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
from parallel.expert_dispatch import AllToAllDispatcher


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
    for e in range(num_experts):
        for pname, p_ref in reference.experts[str(e)].named_parameters():
            want = torch.zeros_like(p_ref) if p_ref.grad is None else p_ref.grad.clone()
            dist.all_reduce(want, group=group)
            summed[(e, pname)] = want
    for e in sharded.local_experts:
        for pname, p_ep in sharded.experts[str(e)].named_parameters():
            want = summed[(e, pname)]
            got = torch.zeros_like(p_ep) if p_ep.grad is None else p_ep.grad
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5,
                                       msg=f"{name}: expert {e} {pname} grad")
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
