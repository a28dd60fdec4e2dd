"""torchrun worker for benchmarks/dep.py: times text-only, DEP and colocated training in one launch."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from parallel.dep_plan import plan_media
from trainer.config import load_config
from trainer.lr_schedule import learning_rate
from trainer.train import DistributedEngine, step_media, synthetic_data


def measure(argv: list[str], steps: int, warmup: int) -> dict:
    cfg = load_config(argv)
    cfg.validate(world_size=dist.get_world_size())
    engine = DistributedEngine(cfg)
    data = synthetic_data(cfg)
    times, loads = [], []
    for step in range(warmup + steps):
        batch = data.global_batch(step, cfg.train.global_batch)
        dist.barrier()
        start = time.perf_counter()
        engine.step(batch, learning_rate(step, cfg.optim, cfg.train.steps))
        dist.barrier()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            media = step_media(batch, cfg.parallel.dp, cfg.train.micro_batch)
            world = dist.get_world_size()
            stage0 = engine.topology.stage0_rank_of_replica
            if cfg.parallel.encoder == "dep":
                load = plan_media(media.refs, world, stage0).load_per_rank(world)
            else:  # the encoder runs where each replica's stage 0 is
                load = [0] * world
                for ref in media.refs:
                    load[stage0[ref.replica]] += ref.num_patches
            loads.append(load)
    engine.topology.destroy()
    step_time = statistics.median(times)
    tokens = cfg.train.global_batch * cfg.data.seq_len
    max_over_mean = [max(l) / (sum(l) / len(l)) if sum(l) else 0.0 for l in loads]
    return {"step_time_s": step_time, "tokens_per_s": tokens / step_time,
            "patches_per_step": sum(loads[0]) if loads else 0,
            "load_max_over_mean": statistics.mean(max_over_mean)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--base", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    base = args.base.split()
    results = {
        "text-only": measure(base + ["--data.media_per_seq", "0"], args.steps, args.warmup),
        "multimodal, DEP": measure(base + ["--parallel.encoder", "dep"], args.steps, args.warmup),
        "multimodal, colocated": measure(base + ["--parallel.encoder", "colocated"],
                                         args.steps, args.warmup),
    }
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
