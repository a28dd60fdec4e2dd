"""torchrun worker for benchmarks/dep.py: times text-only, DEP and colocated training in one
launch, in interleaved rounds.

Each round builds each configuration once (text-only, DEP, colocated; their order rotates
from round to round), runs --warmup untimed steps, then --steps timed ones. On the DEP
engine the timed steps alternate between its two placements of the encoder recompute
(inside the pipeline's bubbles, today's schedule; after the schedule, once the gradients
came back: the schedule without its R action, as before), the first one switching from
round to round, so both see the same data and the same machine noise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from parallel.schedule import Op
from trainer.config import load_config
from trainer.lr_schedule import learning_rate
from trainer.data import build_data
from trainer.train import DistributedEngine

DEP_IN = "multimodal, DEP"
DEP_AFTER = "multimodal, DEP, recompute after"


def run_config(argv: list[str], steps: int, warmup: int, round_index: int,
               times: dict[str, list[float]], loads: dict[str, list[list[int]]],
               dep_after: dict[str, list[float]]) -> None:
    cfg = load_config(argv)
    cfg.validate(world_size=dist.get_world_size())
    engine = DistributedEngine(cfg)
    data = build_data(cfg, engine.data_role())
    dep = cfg.parallel.encoder == "dep" and cfg.data.media_per_seq > 0
    runtime = engine.engine.runtime
    in_bubbles = runtime.actions
    after = [a for a in in_bubbles if a.op is not Op.R]
    name = ("text-only" if cfg.data.media_per_seq == 0 else
            DEP_IN if dep else "multimodal, colocated")
    for step in range(warmup + steps):
        mode = name
        if dep:
            mode = (DEP_IN, DEP_AFTER)[(step + round_index) % 2]
            runtime.actions = in_bubbles if mode == DEP_IN else after
        batch = data.next_batch()
        dist.barrier()
        start = time.perf_counter()
        engine.step(batch, learning_rate(step, cfg.optim, cfg.train.steps))
        dist.barrier()
        if step < warmup:
            continue
        times.setdefault(mode, []).append(time.perf_counter() - start)
        world = dist.get_world_size()
        if dep:
            # the DEP work after the schedule (grads back + backward, and the recompute when
            # it is not in a bubble), the slowest rank's
            after_s = torch.tensor(sum(end - begin for name, kind, begin, end
                                       in engine.engine.phases
                                       if kind == "dep" and name.startswith("DEP grads")))
            dist.all_reduce(after_s, op=dist.ReduceOp.MAX)
            dep_after.setdefault(mode, []).append(float(after_s))
            load = engine.engine.dep.plan.load_per_rank(world)
        else:  # the encoder runs on each replica's stage 0, over that replica's media
            mine = (sum(m.num_patches for m in batch.media)
                    if engine.topology.is_first_stage else 0)
            load = [0] * world
            dist.all_gather_object(load, mine)
        loads.setdefault(mode, []).append(load)
    engine.topology.destroy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--base", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    base = args.base.split()
    configs = [base + ["--data.media_per_seq", "0"], base + ["--parallel.encoder", "dep"],
               base + ["--parallel.encoder", "colocated"]]
    times: dict[str, list[float]] = {}
    loads: dict[str, list[list[int]]] = {}
    dep_after: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for k in range(len(configs)):
            run_config(configs[(k + r) % len(configs)], args.steps, args.warmup, r, times,
                       loads, dep_after)
    results = {}
    cfg = load_config(base)
    tokens = cfg.train.global_batch * cfg.data.seq_len
    for mode in ("text-only", DEP_IN, DEP_AFTER, "multimodal, colocated"):
        step_time = statistics.median(times[mode])
        quartiles = statistics.quantiles(times[mode], n=4)
        max_over_mean = [max(l) / (sum(l) / len(l)) if sum(l) else 0.0 for l in loads[mode]]
        results[mode] = {"step_time_s": step_time, "tokens_per_s": tokens / step_time,
                         "step_p25_p75_s": [quartiles[0], quartiles[2]],
                         "dep_after_schedule_s": (statistics.median(dep_after[mode])
                                                  if mode in dep_after else None),
                         "steps_timed": len(times[mode]),
                         "patches_per_step": statistics.mean(sum(l) for l in loads[mode]),
                         "load_max_over_mean": statistics.mean(max_over_mean)}
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
