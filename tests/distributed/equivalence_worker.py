"""Worker: train the tiny model under several parallel layouts in one torchrun launch.

For each layout given on the command line (e.g. `pp=2,vpp=2` or `pp=2,ep=2,dp=2`; also
`bucket=N` ZeRO-1 bucket elements, `overlap=0` reduce-scatters only in the step,
`dtype=bf16`),
build the topology and the parallel engine, train `--steps` steps on the
synthetic data and gather every parameter (and router bias) to rank 0, which
saves {layout: {"loss": [...], "grad_norm": [...], "tensors": {name: tensor}}}.

A layout may name a mutant, a deliberate bug the test must catch:
  mutant=drop_expert_bucket   expert gradients are not reduced over expert-DP
  mutant=drop_microbatch      the schedule silently leaves out the last microbatch(es)
  mutant=skip_encoder_backward  DEP never back-propagates into the vision encoder
  mutant=ignore_media         stage 0 drops the media embeddings DEP hands it
  mutant=read_before_reduce_scatter  ZeRO-1 reads gradient shards before their collectives land
  mutant=local_newton_schulz  Muon orthogonalises only the local part of a matrix cut by shards
  mutant=local_max_logit      QK-Clip uses this replica's max logits, not the DP maximum
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch
import torch.distributed as dist

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
    cfg.validate(world_size=dist.get_world_size())
    return cfg


def apply_mutant(dist_engine: DistributedEngine, mutant: str, microbatches: int) -> None:
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
    elif mutant == "ignore_media":  # stage 0 drops the media embeddings it is handed
        for module in engine.stages.values():
            forward = module.forward
            module.forward = lambda x, inputs, media_embeds=None, forward=forward: forward(
                x, inputs, None)
    elif mutant == "skip_encoder_backward":
        dep = engine.dep
        dep.backward = lambda: setattr(dep, "_leaves", {})
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
    elif mutant:
        raise ValueError(f"unknown mutant {mutant!r}")


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
        apply_mutant(engine, layout.get("mutant", ""), cfg.microbatches_per_replica)
        records = train(cfg, rank=dist.get_rank(), engine=engine)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, engine.engine.named_tensors())
        tensors: dict[str, torch.Tensor] = {}
        for rank_tensors in gathered:
            for name, value in rank_tensors.items():
                if name in tensors and not torch.equal(tensors[name], value):
                    raise AssertionError(f"{text}: replicas disagree on {name}")
                tensors[name] = value
        results[text] = {"loss": [r["loss"] for r in records],
                         "grad_norm": [r["grad_norm"] for r in records], "tensors": tensors}
        engine.topology.destroy()
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
