"""torchrun worker for benchmarks/dep.py: times text-only, DEP and colocated training in one launch."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from trainer.config import load_config
from trainer.lr_schedule import learning_rate
from trainer.data import build_data
from trainer.train import DistributedEngine


def measure(argv: list[str], steps: int, warmup: int) -> dict:
    cfg = load_config(argv)
    cfg.validate(world_size=dist.get_world_size())
    engine = DistributedEngine(cfg)
    data = build_data(cfg, engine.data_role())
    times, loads = [], []
    for step in range(warmup + steps):
        batch = data.next_batch()
        dist.barrier()
        start = time.perf_counter()
        engine.step(batch, learning_rate(step, cfg.optim, cfg.train.steps))
        dist.barrier()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            world = dist.get_world_size()
            if cfg.parallel.encoder == "dep":
                load = engine.engine.dep.plan.load_per_rank(world)
            else:  # the encoder runs on each replica's stage 0, over that replica's media
                mine = (sum(m.num_patches for m in batch.media)
                        if engine.topology.is_first_stage else 0)
                load = [0] * world
                dist.all_gather_object(load, mine)
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
