"""Benchmark: the ZeRO-1 optimizer step and state, AdamW vs MuonClip (issue 16).

    python -m benchmarks.optimizer [--configs tiny,small] [--dp 2] [--rounds 3] [--steps 3]
                                   [--small-layers 2] [--dtypes fp32,bf16]

Per config one launch of --dp gloo ranks (one thread each) holds the parameters of one
pipeline stage as benchmarks/zero1.py builds them (`tiny` whole; `small` its embedding,
first --small-layers LM layers and the vision encoder); dense, expert and encoder
parameters are ZeRO-1 groups over the --dp ranks. Variants, run in turn round after
round (A B C D A B C D ...):

    adamw      every parameter AdamW (exp_avg, exp_avg_sq)
    muonclip   hidden matrices Muon (momentum; bucket all-gather + Newton-Schulz in fp32
               on CPU) with QK-Clip (every head over tau: the clip's worst case), the
               rest AdamW

each in every --dtypes compute dtype. Each round builds the variant, takes one untimed
step, then times --steps optimizer steps on fixed random gradients (reduce-scatter, norm,
clip, update, all-gather). Printed: medians over rounds and steps of the slowest rank;
memory is the largest rank's.

    state MiB    optimizer state a rank holds between steps (the issue's "state bytes")
    master MiB   fp32 master weights a rank holds (bf16 only)
    step +MiB    peak RSS increase during the steps (transient buffers: Muon's gathered
                 bucket and Newton-Schulz temporaries)
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.zero1 import PeakRss, build_params, fill_grads, largest, timed
from model.config import preset
from parallel.adamw import AdamW, AdamWConfig
from parallel.muon import Muon, MuonConfig, muon_param_groups
from parallel.qk_clip import KV_UP, Q_UP, MLAHeads, QKClip
from parallel.zero1 import Zero1Optimizer
from trainer.profile import format_columns

RULES = ("adamw", "muonclip")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADER = ("config", "optimizer", "dtype", "step ms", "state MiB", "master MiB", "step +MiB")
MiB = 2 ** 20


def build_optimizer(rule: str, config: str, named, dtype: torch.dtype) -> Zero1Optimizer:
    world = dist.group.WORLD
    muon = None
    if rule == "muonclip":
        lm = preset(config).lm
        clip = QKClip(MLAHeads(lm.heads, lm.qk_nope_head_dim, lm.qk_rope_head_dim,
                               lm.v_head_dim), tau=100.0)
        muon = Muon(MuonConfig(weight_decay=0.1), clip=clip)
        attention = {n[:-len(Q_UP)] for n, _ in named if n.endswith(Q_UP)} | \
            {n[:-len(KV_UP)] for n, _ in named if n.endswith(KV_UP)}
        clip.set_max_logits({a: torch.full((lm.heads,), 200.0) for a in attention})
    kinds = {"dense": [], "expert": [], "encoder": []}
    for n, p in named:
        kinds["encoder" if n.startswith("vision.") else
              "expert" if ".experts." in n else "dense"].append((n, p))
    groups = [g for items in kinds.values() for g in muon_param_groups(items, world, muon)]
    return Zero1Optimizer(groups, norm_group=world, rule=AdamW(AdamWConfig(weight_decay=0.1)),
                          param_dtype=dtype)


def run_variant(rule: str, dtype_name: str, args) -> dict:
    gc.collect()  # the previous variant's parameters and optimizer (hooks make cycles)
    named = build_params(args.config, args.small_layers)
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    grads = {n: torch.randn(p.shape, generator=gen) * 1e-3 for n, p in named}
    opt = build_optimizer(rule, args.config, named, DTYPES[dtype_name])
    fill_grads("new", opt, named, grads)
    opt.step(1e-3)  # a first step touches every buffer's pages
    opt.zero_grad()
    result = {"step": []}
    with PeakRss() as peak:
        for _ in range(args.steps):
            fill_grads("new", opt, named, grads)
            result["step"].append(timed(lambda: opt.step(1e-3)))
            opt.zero_grad()
    memory = opt.memory_bytes()
    result.update({"step +MiB": largest(peak.increase), "state": largest(memory["state"]),
                   "master": largest(memory["master"])})
    del opt, named, grads
    return result


def worker(rank: int, args, init_file: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=args.dp)
    for _ in range(args.rounds):
        for dtype_name in args.dtypes:
            for rule in RULES:
                result = run_variant(rule, dtype_name, args)
                if rank == 0:
                    results.append(((rule, dtype_name), result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--small-layers", type=int, default=2)
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    args.dtypes = args.dtypes.split(",")
    rows = []
    for config in args.configs.split(","):
        args.config = config
        with mp.Manager() as manager, tempfile.TemporaryDirectory() as tmp:
            results = manager.list()
            mp.spawn(worker, args=(args, os.path.join(tmp, "store"), results), nprocs=args.dp)
            results = list(results)
        for dtype_name in args.dtypes:
            for rule in RULES:
                runs = [r for key, r in results if key == (rule, dtype_name)]

                def median(key):
                    return statistics.median(x for r in runs for x in
                                             (r[key] if isinstance(r[key], list) else [r[key]]))
                rows.append((config, rule, dtype_name, f"{median('step') * 1e3:.0f}",
                             *(f"{median(k) / MiB:.1f}" for k in ("state", "master",
                                                                    "step +MiB"))))
        print(f"ZeRO-1 step over dp={args.dp} gloo ranks (1 thread each), {args.rounds} rounds "
              f"x {args.steps} steps; per rank; medians", flush=True)
        print(format_columns(HEADER, rows), flush=True)


if __name__ == "__main__":
    main()
