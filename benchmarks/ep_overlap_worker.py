"""torchrun worker of benchmarks/ep_overlap.py: step time and all-to-all time, overlapped
schedule against the plain one, on one engine, rounds interleaved (plain, overlapped, ...).

Network emulation (this benchmark only, never production code): every token all-to-all
takes at least `--latency-ms` on the communication side. An async one (the overlapped
schedule) completes no sooner than that long after it started, however late its handle is
waited for; a blocking one (the plain schedule's autograd all-to-all) returns that long
after it was called. The per-expert counts exchange is not delayed (it is tiny, and the
same in both schedules). Rank 0 writes one JSON object per (latency, variant, round).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from parallel import expert_dispatch
from trainer.config import load_config
from trainer.data import build_data
from trainer.lr_schedule import learning_rate
from trainer.train import DistributedEngine

LATENCY_S = [0.0]  # the emulated latency now in force
BLOCKING = {"count": 0, "seconds": 0.0}  # the plain schedule's all-to-alls (all exposed)


class SlowPending(expert_dispatch.PendingAllToAll):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ready_at = time.perf_counter() + LATENCY_S[0]

    def wait(self):
        time.sleep(max(0.0, self.ready_at - time.perf_counter()))
        return super().wait()


def slow_blocking(function):
    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        out = function(*args, **kwargs)
        time.sleep(LATENCY_S[0])
        BLOCKING["count"] += 1
        BLOCKING["seconds"] += time.perf_counter() - start
        return out
    return staticmethod(wrapped)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[10.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    expert_dispatch.PendingAllToAll = SlowPending
    expert_dispatch._AllToAll.forward = slow_blocking(expert_dispatch._AllToAll.forward)
    expert_dispatch._AllToAll.backward = slow_blocking(expert_dispatch._AllToAll.backward)
    cfg = load_config(overrides)
    cfg.validate(world_size=dist.get_world_size())
    engine = DistributedEngine(cfg)
    data = build_data(cfg, engine.data_role())
    step = 0

    def run(overlap: bool) -> dict:
        nonlocal step
        engine.engine.set_ep_overlap(overlap)
        times, count, waited, paired_count, paired_wait = [], 0, 0.0, 0, 0.0
        for timed in [False] + [True] * args.steps:  # one untimed step after switching
            BLOCKING.update(count=0, seconds=0.0)
            batch = data.next_batch()
            dist.barrier()
            start = time.perf_counter()
            engine.step(batch, learning_rate(step, cfg.optim, 10 ** 6))
            elapsed = time.perf_counter() - start
            step += 1
            if not timed:
                continue
            times.append(elapsed)
            a2a = engine.engine.runtime.a2a
            if overlap:
                count += a2a["alone"][0] + a2a["paired"][0]
                waited += a2a["alone"][1] + a2a["paired"][1]
                paired_count += a2a["paired"][0]
                paired_wait += a2a["paired"][1]
            else:
                count += BLOCKING["count"]
                waited += BLOCKING["seconds"]
        per_step = {"step_s": statistics.median(times), "a2a": count / args.steps,
                    "exposed_s": waited / args.steps, "paired_a2a": paired_count / args.steps,
                    "paired_exposed_s": paired_wait / args.steps}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, per_step)
        return {key: statistics.fmean(g[key] for g in gathered) for key in per_step} | {
            "step_s": max(g["step_s"] for g in gathered)}

    records = []
    for latency_ms in args.latency_ms:
        LATENCY_S[0] = latency_ms / 1000
        for round_ in range(args.rounds):
            for variant, overlap in (("plain", False), ("overlapped", True)):
                records.append({"latency_ms": latency_ms, "variant": variant, "round": round_,
                                **run(overlap)})
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(records, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
