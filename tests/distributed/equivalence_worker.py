"""Worker: train the tiny model under several parallel layouts in one torchrun launch.

For each layout given on the command line (e.g. `pp=2,vpp=2` or `pp=2,ep=2,dp=2`; also
`bucket=N` ZeRO-1 bucket elements, `overlap=0` reduce-scatters only in the step,
`dtype=bf16`, `dep_group=N` sets parallel.dep_group_replicas, `ep_overlap=false`,
`memory=none|report|lossless`: the memory policy, where `lossless` recomputes the report's
regions and offloads every region, `steps=N` overrides train.steps), build the topology and
the parallel engine, train on the synthetic data and gather every parameter (and router
bias) to rank 0, which
saves {layout: {"loss": [...], "grad_norm": [...], "tensors": {name: tensor},
"dep_problems": [...], "dep_patches_encoded": [per rank],
"dp_all_reduces_per_step": [per rank]}}: the all-reduces each rank issued on its
data-parallel group, per step (the global token count and the step's model statistics).

DEP balance in the real engine path: after every DEP forward each rank compares what
its encoder actually ran on (`DecoupledEncoder.stats`: items and patch rows) with what
the LPT plan assigns it, recomputed here from the step's media metadata with the real
planner; every disagreement is a "dep_problems" entry.

A layout may name a mutant, a deliberate bug the test must catch:
  mutant=drop_expert_bucket   expert gradients are not reduced over expert-DP
  mutant=drop_microbatch      the schedule silently leaves out the last microbatch(es)
  mutant=skip_encoder_backward  DEP never back-propagates into the vision encoder
  mutant=ignore_media         stage 0 drops the media embeddings DEP hands it
  mutant=read_before_reduce_scatter  ZeRO-1 reads gradient shards before their collectives land
  mutant=average_dp_grads     the ZeRO-1 reduction averages gradients instead of summing
                              them (with clipping and Adam, losses and parameters barely move)
  mutant=encode_on_owners     DEP skips the balancing: each stage-0 rank encodes its own
                              replica's media (numerically the same run)
  mutant=early_a2a_read       the overlapped schedule reads an all-to-all's receive buffer
                              before its handle completed
  mutant=local_newton_schulz  Muon orthogonalises only the local part of a matrix cut by shards
  mutant=local_max_logit      QK-Clip uses this replica's max logits, not the DP maximum
  mutant=per_layer_statistics  router loads and max logits reduced with one all-reduce per
                              layer (numerically the same run: caught by the count only)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from unittest import mock

import torch
import torch.distributed as dist

from model.memory_policy import REPORT_RECOMPUTE, all_regions
from parallel.dep_plan import plan_media
from parallel.topology import ParallelSizes
from tests.parallel.zero1_mutants import drop_reduce_scatter, read_before_reduce_scatter
from trainer.config import JobConfig, load_config
from trainer.train import DistributedEngine, train


def job_config(base: list[str], layout: dict) -> JobConfig:
    cfg = load_config(base)
    for key in ("pp", "vpp", "ep", "dp"):
        setattr(cfg.parallel, key, int(layout.get(key, 1)))
    cfg.parallel.encoder = layout.get("encoder", cfg.parallel.encoder)
    cfg.parallel.layout = layout.get("layout", cfg.parallel.layout)
    cfg.parallel.bucket_numel = int(layout.get("bucket", cfg.parallel.bucket_numel))
    cfg.parallel.overlap_grad_reduce = layout.get("overlap", "1") == "1"
    cfg.train.dtype = layout.get("dtype", cfg.train.dtype)
    cfg.parallel.dep_group_replicas = int(layout.get("dep_group", cfg.parallel.dep_group_replicas))
    cfg.train.steps = int(layout.get("steps", cfg.train.steps))
    if "ep_overlap" in layout:
        cfg.parallel.ep_overlap = layout["ep_overlap"] == "true"
    if layout.get("memory") == "lossless":
        cfg.memory.policy = "custom"
        cfg.memory.recompute = sorted(REPORT_RECOMPUTE)
        cfg.memory.offload = sorted(all_regions())
    elif "memory" in layout:
        cfg.memory.policy = layout["memory"]
    cfg.validate(world_size=dist.get_world_size())
    return cfg


def apply_mutant(dist_engine: DistributedEngine, mutant: str, microbatches: int,
                 patches: contextlib.ExitStack) -> None:
    """Break the engine on purpose; what outlives the engine goes on `patches` (undone after)."""
    engine = dist_engine.engine
    if mutant == "drop_expert_bucket":  # expert buckets keep this rank's own gradient
        drop_reduce_scatter(engine.optimizer,
                            lambda group, b: any(".experts." in n for n in group.names))
    elif mutant == "read_before_reduce_scatter":
        read_before_reduce_scatter(engine.optimizer)
    elif mutant == "drop_microbatch":
        from parallel.schedule import schedule
        sizes = dist_engine.topology.sizes
        dropped = sizes.pp if sizes.vpp > 1 else 1  # interleaving needs a multiple of pp
        engine.runtime.actions = schedule(sizes.pp, sizes.vpp, microbatches - dropped)[
            dist_engine.topology.pp_rank]
    elif mutant == "early_a2a_read":  # read an all-to-all's buffer before it completed
        from parallel import expert_dispatch

        real_start = expert_dispatch.PendingAllToAll

        class EarlyRead(real_start):
            def __init__(self, x_ND, send_splits, recv_splits, group):
                out = x_ND.new_full((sum(recv_splits),) + tuple(x_ND.shape[1:]), float("nan"))
                self.out, self._send = out, x_ND.detach().contiguous()
                self.work = dist.all_to_all_single(out, self._send, recv_splits, send_splits,
                                                   group=group, async_op=True)
                self.early = out.clone()  # the peers cannot have delivered yet

            def wait(self):
                self.work.wait()  # keep the collectives matched
                return self.early

        expert_dispatch.PendingAllToAll = EarlyRead
        patches.callback(setattr, expert_dispatch, "PendingAllToAll", real_start)
    elif mutant == "ignore_media":  # stage 0 drops the media embeddings it is handed
        for module in engine.stages.values():
            forward = module.forward
            module.forward = lambda x, inputs, media_embeds=None, forward=forward: forward(
                x, inputs, None)
    elif mutant == "skip_encoder_backward":
        dep = engine.dep
        dep.backward = lambda: setattr(dep, "_leaves", {})
    elif mutant == "average_dp_grads":
        opt = engine.optimizer
        original = opt._wait_reduce_scatter

        def averaged(group, bucket):
            return original(group, bucket).div_(group.size)
        opt._wait_reduce_scatter = averaged
    elif mutant == "encode_on_owners":
        def owners_encode(refs, world, stage0_rank_of_replica):
            plan = plan_media(refs, world, stage0_rank_of_replica)
            return dataclasses.replace(plan, encoder_rank=plan.owner_rank)
        # the engine's plan and the loaders' selection (trainer/train.py) alike
        patches.enter_context(mock.patch("parallel.dep.plan_media", owners_encode))
        patches.enter_context(mock.patch("parallel.dep_plan.plan_media", owners_encode))
    elif mutant == "local_newton_schulz":  # the bucket gather sees only this rank's shard
        for group in engine.optimizer.groups:
            for shard in group.shards:
                def local(t, shard=shard):
                    whole = t.new_zeros(shard.layout.padded_numel)
                    start, end = shard.layout.shard_range(shard.rank)
                    whole[start:end] = t
                    return whole
                shard.all_gather = local
    elif mutant == "local_max_logit":  # keep each module's own max, drop the DP reduction
        local = {}
        for name, mla in engine.attention.items():
            def take(take=mla.take_max_logit, name=name):
                local[name] = take()
                return local[name].clone()
            mla.take_max_logit = take
        set_max_logits = engine.clip.set_max_logits
        engine.clip.set_max_logits = lambda reduced: set_max_logits(
            {n: local[n] for n in reduced})
    elif mutant == "per_layer_statistics":
        def per_layer(sums, maxima, group):
            sums = {n: t.clone() for n, t in sums.items()}
            maxima = {n: t.clone() for n, t in maxima.items()}
            for t in sums.values():
                dist.all_reduce(t, group=group)
            for t in maxima.values():
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            return sums, maxima
        patches.enter_context(mock.patch("parallel.engine.reduce_step_statistics", per_layer))
    elif mutant:
        raise ValueError(f"unknown mutant {mutant!r}")


def watch_dep_balance(dist_engine: DistributedEngine, problems: list[str]) -> list[int]:
    """After every DEP forward, compare what this rank encoded with what the plan assigns it.

    Returns a one-element list holding this rank's total of encoded patches (grows per step).
    """
    dep = dist_engine.engine.dep
    total = [0]
    if dep is None:
        return total
    forward = dep.forward

    def checked_forward(media):
        leaves = forward(media)
        plan = plan_media(dep.plan.items, dep.world, dep.stage0_rank_of_replica)
        assigned = plan.items_encoded_by(dep.rank)
        want = (len(assigned), sum(m.num_patches for m in assigned))
        got = (dep.stats["dep_items_encoded"], dep.stats["dep_patches_encoded"])
        if got != want:
            problems.append(f"rank {dep.rank}: encoded {got[0]} items / {got[1]} patches, "
                            f"the plan assigns {want[0]} items / {want[1]} patches")
        total[0] += got[1]
        return leaves
    dep.forward = checked_forward
    return total


def count_dp_all_reduces(dist_engine: DistributedEngine, patches: contextlib.ExitStack
                         ) -> list[int]:
    """A one-element list counting this rank's all-reduces on its data-parallel group."""
    dp_group, real, count = dist_engine.topology.dp_group, dist.all_reduce, [0]

    def counted(*args, **kwargs):
        count[0] += kwargs.get("group") is dp_group
        return real(*args, **kwargs)
    patches.enter_context(mock.patch("torch.distributed.all_reduce", counted))
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", required=True, help="';'-separated, e.g. 'pp=2,vpp=2;ep=2,dp=2'")
    parser.add_argument("--base", default="", help="config overrides shared by all layouts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for text in args.layouts.split(";"):
        layout = dict(item.split("=") for item in text.split(","))
        cfg = job_config(args.base.split(), layout)
        cfg.job.run_dir = os.path.join(os.path.dirname(args.out), text.replace(",", "_"))
        engine = DistributedEngine(cfg)
        dep_problems: list[str] = []
        encoded = watch_dep_balance(engine, dep_problems)
        with contextlib.ExitStack() as patches:
            apply_mutant(engine, layout.get("mutant", ""), cfg.microbatches_per_replica, patches)
            all_reduces = count_dp_all_reduces(engine, patches)
            records = train(cfg, rank=dist.get_rank(), engine=engine)
        gathered = [None] * dist.get_world_size()
        # clones: the parameters are views into ZeRO-1's flat buffers, and pickling a view
        # pickles its whole storage (every tensor would carry its whole bucket)
        dist.all_gather_object(gathered, {n: t.clone() for n, t in
                                          engine.engine.named_tensors().items()})
        tensors: dict[str, torch.Tensor] = {}
        for rank_tensors in gathered:
            for name, value in rank_tensors.items():
                if name in tensors and not torch.equal(tensors[name], value):
                    if "mutant" not in layout:  # a mutant may break replicas apart: fine
                        raise AssertionError(f"{text}: replicas disagree on {name}")
                    continue
                tensors[name] = value
        balance = [None] * dist.get_world_size()
        memory = [r.get(k, 0.0) for r in records
                  for k in ("act_peak_host_MiB", "act_prefetched_MiB")]
        dist.all_gather_object(balance, (dep_problems, encoded[0],
                                         all_reduces[0] / max(len(records), 1), memory))
        results[text] = {"loss": [r["loss"] for r in records],
                         "grad_norm": [r["grad_norm"] for r in records], "tensors": tensors,
                         "dep_problems": [p for problems, *_ in balance for p in problems],
                         "dep_patches_encoded": [n for _, n, *_ in balance],
                         "dp_all_reduces_per_step": [n for _, _, n, _ in balance],
                         # per rank: host-pool peak and prefetched MiB of every step
                         "offload_MiB": [m for _, _, _, m in balance]}
        engine.topology.destroy()
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
