"""torchrun worker of benchmarks/pipeline.py: time a few training steps, action by action.

    torchrun --nproc-per-node 2 -m benchmarks.pipeline_worker --out DIR/result.json \
        --warmup 1 --steps 3 --parallel.pp 2 --parallel.vpp 2 --train.global_batch 8 ...

Every option it does not know is a job-config override (trainer/config.py). Per step
each rank passes a barrier, takes its t0, runs `DistributedEngine.step` and turns the
pipeline runtime's per-action timestamps into spans on one time axis whose origin is the
earliest rank's t0: `time.perf_counter` is CLOCK_MONOTONIC, one clock for every process of
a machine, so the spans of different ranks compare exactly (no barrier-exit skew; this
worker runs on one machine). The rest of the step (loss all-reduce, ZeRO-1 step, router
biases) becomes one "optimizer" span. Rank 0 gathers every rank's spans, step times and
peak memory into one JSON file.

One layout per launch: on CPU the peak memory is the process's peak RSS, which never
goes down, so a second layout in the same process would inherit the first one's peak.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import load_config
from trainer.lr_schedule import learning_rate
from trainer.profile import (RankInfo, peak_memory_bytes, step_spans,
                             torch_profiler_trace)
from trainer.data import build_data
from trainer.train import DistributedEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--torch-profile", default="",
                        help="folder: run one more (untimed) step under torch.profiler and "
                             "export torch_trace_rank<r>.json there")
    args, overrides = parser.parse_known_args()
    if args.warmup < 0 or args.steps < 1:
        parser.error(f"need --warmup >= 0 and --steps >= 1, got {args.warmup}, {args.steps}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = load_config(overrides)
    cfg.validate(world_size=dist.get_world_size())
    engine = DistributedEngine(cfg)
    topology, runtime = engine.topology, engine.engine.runtime
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    data = build_data(cfg, engine.data_role())
    total = args.warmup + args.steps
    step_times: list[float] = []
    spans_per_step: list[list[dict]] = []
    for step in range(total):
        batch = data.next_batch()
        lr = learning_rate(step, cfg.optim, total)
        dist.barrier()
        t0 = time.perf_counter()
        engine.step(batch, lr)
        t1 = time.perf_counter()
        if step < args.warmup:
            continue
        origin = torch.tensor(t0, dtype=torch.float64)
        dist.all_reduce(origin, op=dist.ReduceOp.MIN)
        spans = step_spans(topology.rank, runtime.timeline, engine.engine.phases, float(origin))
        step_times.append(t1 - t0)
        spans_per_step.append([s.to_dict() for s in spans])
    if args.torch_profile:  # after the timed steps: the profiler's overhead skews timings
        batch = data.next_batch()
        with torch_profiler_trace(True, args.torch_profile, topology.rank):
            engine.step(batch, learning_rate(total, cfg.optim, total + 1))
    mine = {"info": asdict(RankInfo(topology.rank, topology.pp_rank, topology.dp_rank)),
            "peak_memory_bytes": peak_memory_bytes(), "step_times": step_times,
            "spans_per_step": spans_per_step}
    gathered = [None] * dist.get_world_size() if topology.rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if topology.rank == 0:
        result = {"pp": cfg.parallel.pp, "vpp": cfg.parallel.vpp, "dp": cfg.parallel.dp,
                  "microbatches": cfg.microbatches_per_replica, "layers": cfg.model.lm.layers,
                  "seq_len": cfg.data.seq_len, "micro_batch": cfg.train.micro_batch,
                  "warmup": args.warmup, "steps": args.steps, "overrides": overrides,
                  "ranks": gathered}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result))
    topology.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
