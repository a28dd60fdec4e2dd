"""Benchmark: ZeRO-1 and its checkpoints before and after the rebuild (issue 12).

    python -m benchmarks.zero1 [--configs tiny,small] [--dp 2] [--rounds 3] [--steps 3]
                               [--small-layers 2] [--out runs/bench_zero1]

Per config, one launch of --dp gloo ranks (one thread each) holds that config's parameters
as one pipeline stage would: `tiny` whole, `small` its embedding and first --small-layers LM
layers (stage 0 of pp=6: 130M parameters) plus the replicated vision encoder; dense,
expert and encoder parameters are three ZeRO-1 groups over the --dp ranks. The variants

    old fp32   parallel/zero1.py and trainer/checkpoint.py of commit BASELINE (git show):
               grads copied into a fresh flat bucket per step, params copied in and out,
               checkpoints gather every parameter's full moments on every rank, resume
               checksums the whole checkpoint on every rank
    new fp32   persistent flat buffers, in-place collectives, sharded checkpoints
    new bf16   bf16 weights, fp32 grads, fp32 masters and moments in the shard only

run in turn, round after round (A B C A B C ...); the table is printed after each config.
Each round builds the variant's parameters and optimizer, takes one untimed step (it
touches every buffer's pages), times --steps optimizer steps on fixed random gradients
(the step after the backward: reduce-scatter, norm, clip, AdamW, all-gather; the overlap
of the reduce-scatter with the backward is not in this number), saves a checkpoint of
parameters + optimizer state and loads it back, then frees everything. Printed: medians
over rounds (and steps) of the slowest rank; memory is the largest rank's.

    weights / grads / master / moments MiB   bytes a rank holds for them between steps
    step +MiB     peak RSS increase during the steps: transient buffers of the step
    save s, save +MiB, load s, load +MiB     time and peak RSS increase of save and resume
    ckpt MiB      bytes on disk
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.config import preset
from model.lm import ChunkSpec, LanguageModelChunk
from model.vision_language import VisionEncoder
from parallel.adamw import AdamW, AdamWConfig
from parallel.zero1 import Zero1Optimizer
from trainer.checkpoint import CheckpointManager
from trainer.profile import format_columns

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "7910fd8"  # main before the rebuild
VARIANTS = ("old fp32", "new fp32", "new bf16")
HEADER = ("config", "variant", "step ms", "weights MiB", "grads MiB", "master MiB",
          "moments MiB", "step +MiB", "save s", "save +MiB", "load s", "load +MiB", "ckpt MiB")
ADAMW = AdamWConfig(weight_decay=0.1)
MiB = 2 ** 20


def module_at(commit: str, path: str, name: str) -> types.ModuleType:
    """A module of this repository as it was at `commit`."""
    source = subprocess.check_output(["git", "show", f"{commit}:{path}"], cwd=ROOT, text=True)
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return module


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class PeakRss:
    """Peak RSS increase over a block (Linux: VmHWM reset through /proc/self/clear_refs)."""

    def __enter__(self):
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        self.before = rss_bytes()
        return self

    def __exit__(self, *exc):
        self.increase = rss_bytes("VmHWM") - self.before


def build_params(config: str, small_layers: int) -> list[tuple[str, torch.nn.Parameter]]:
    cfg = preset(config)
    layers = cfg.lm.layers if config == "tiny" else small_layers
    torch.manual_seed(0)
    spec = ChunkSpec(embed=True, layers=range(layers), head=layers == cfg.lm.layers)
    modules = {"lm": LanguageModelChunk(cfg.lm, spec), "vision": VisionEncoder(cfg)}
    named = [(f"{prefix}.{n}", p) for prefix, m in modules.items() for n, p in m.named_parameters()]
    with torch.no_grad():
        for _, p in named:
            p.normal_(0.0, 0.02)
    return named


def param_groups(named, group) -> list[tuple]:
    """(params, process group, names) per group: both versions take these tuples."""
    kinds = {"dense": [], "expert": [], "encoder": []}
    for n, p in named:
        kinds["encoder" if n.startswith("vision.") else
              "expert" if ".experts." in n else "dense"].append((n, p))
    return [([p for _, p in items], group, [n for n, _ in items])
            for items in kinds.values() if items]


def fill_grads(variant: str, opt, named, grads: dict[str, torch.Tensor]) -> None:
    """This step's gradients, where each variant keeps them (not timed)."""
    if variant == "old fp32":
        for n, p in named:
            p.grad = grads[n]
        return
    for group in opt.groups:
        for bucket in group.buckets:
            base = group.bucket_base[bucket.index]
            for slot in bucket.slots:
                group.grads_flat[base + slot.offset:base + slot.end].copy_(
                    grads[slot.name].view(-1))


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def largest(value: int) -> int:
    t = torch.tensor(value, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def run_variant(variant: str, args, old, out: Path) -> dict:
    gc.collect()  # the previous variant's parameters and optimizer (hooks make cycles)
    world = dist.group.WORLD
    named = build_params(args.config, args.small_layers)
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    grads = {n: torch.randn(p.shape, generator=gen) * 1e-3 for n, p in named}
    if variant == "old fp32":
        opt = old["zero1"].Zero1Optimizer(param_groups(named, world), norm_group=world,
                                          config=ADAMW)
    else:
        opt = Zero1Optimizer(param_groups(named, world), norm_group=world, rule=AdamW(ADAMW),
                             param_dtype=torch.bfloat16 if "bf16" in variant else torch.float32)
    fill_grads(variant, opt, named, grads)  # a first step touches every buffer's pages
    opt.step(1e-3)
    opt.zero_grad()
    result = {"step": []}
    with PeakRss() as peak:
        for _ in range(args.steps):
            fill_grads(variant, opt, named, grads)
            result["step"].append(timed(lambda: opt.step(1e-3)))
            opt.zero_grad()
    result["step +MiB"] = largest(peak.increase)
    if variant == "old fp32":
        p_bytes = sum(p.numel() * 4 for _, p in named)
        result.update({"weights": p_bytes, "grads": p_bytes, "master": 0,
                       "moments": opt.state_bytes()})
    else:
        memory = opt.memory_bytes()
        result.update({"weights": memory["weights"], "grads": memory["grads"],
                       "master": memory["master"], "moments": memory["state"]})
    model = {n: p.detach() for n, p in named}
    directory = out / variant.replace(" ", "_")
    if dist.get_rank() == 0 and directory.exists():
        shutil.rmtree(directory)
    dist.barrier()
    if variant == "old fp32":
        manager = old["checkpoint"].CheckpointManager(directory, keep=1)
        with PeakRss() as peak:
            result["save s"] = timed(lambda: manager.save(1, model, opt.full_state(), {}))
        result["save +MiB"] = largest(peak.increase)

        def load():
            path = manager.resolve(str(directory / "checkpoints" / "step_00000001"))
            state = {n: {k: torch.zeros_like(p) for k in ("exp_avg", "exp_avg_sq")}
                     for n, p in model.items()}
            manager.load(path, model, state, same_world=True)
            opt.load_full_state(state, 1)
    else:
        manager = CheckpointManager(directory, keep=1)
        with PeakRss() as peak:
            result["save s"] = timed(lambda: manager.save(1, model, opt.state_pieces(), {}))
        result["save +MiB"] = largest(peak.increase)

        def load():
            path = manager.resolve(str(directory / "checkpoints" / "step_00000001"))
            saved = manager.saved_keys(path)
            weights, state = opt.load_targets(lambda n: f"optim.{n}.master" in saved)
            manager.load(path, weights, state, same_world=True)
            opt.finish_load(1)
    with PeakRss() as peak:
        result["load s"] = timed(load)
    result["load +MiB"] = largest(peak.increase)
    dist.barrier()
    if dist.get_rank() == 0:
        result["ckpt"] = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        shutil.rmtree(directory)
    del opt, named, grads, model
    return result


def worker(rank: int, args, init_file: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=args.dp)
    old = {"zero1": module_at(BASELINE, "parallel/zero1.py", "old_zero1"),
           "checkpoint": module_at(BASELINE, "trainer/checkpoint.py", "old_checkpoint")}
    out = Path(args.out) / args.config
    for _ in range(args.rounds):
        for variant in VARIANTS:
            result = run_variant(variant, args, old, out)
            if rank == 0:
                results.append((variant, result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--small-layers", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_zero1")
    args = parser.parse_args()
    rows = []
    for config in args.configs.split(","):
        args.config = config
        with mp.Manager() as manager, tempfile.TemporaryDirectory() as tmp:
            results = manager.list()
            mp.spawn(worker, args=(args, os.path.join(tmp, "store"), results), nprocs=args.dp)
            results = list(results)
        for variant in VARIANTS:
            runs = [r for v, r in results if v == variant]

            def median(key):
                return statistics.median(x for r in runs for x in
                                         (r[key] if isinstance(r[key], list) else [r[key]]))
            rows.append((config, variant, f"{median('step') * 1e3:.0f}",
                         *(f"{median(k) / MiB:.1f}" for k in ("weights", "grads", "master",
                                                                "moments", "step +MiB")),
                         f"{median('save s'):.2f}", f"{median('save +MiB') / MiB:.0f}",
                         f"{median('load s'):.2f}", f"{median('load +MiB') / MiB:.0f}",
                         f"{median('ckpt') / MiB:.0f}"))
        print(f"ZeRO-1 over dp={args.dp} gloo ranks (1 thread each), {args.rounds} rounds x "
              f"{args.steps} steps; per rank; medians; old = commit {BASELINE}", flush=True)
        print(format_columns(HEADER, rows), flush=True)  # the table so far


if __name__ == "__main__":
    main()
