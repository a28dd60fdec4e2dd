"""DEP vs colocated vision encoder vs text-only training: one run, same machine, same LM tokens.

    python -m benchmarks.dep [--pp 2] [--dp 2] [--steps 4] [--rounds 4]

Prints LM tokens/s of text-only training, of multimodal training with DEP (its encoder
recompute inside the pipeline's bubbles, and after the schedule as before) and with the
encoder colocated on pipeline stage 0, the multimodal/text-only ratios (the Kimi K2.5
report's figure for DEP is 90%), and the per-rank encoder load (max/mean patch count over
all ranks), and how long DEP's work after the schedule takes (what the recompute in the
bubbles removes from it). Configurations run in interleaved rounds (benchmarks/dep_worker.py); the table
shows medians over every timed step of every round. The data has a realistic skew: mostly
small images, a few large ones, some 4-frame chunks (synthetic generator). One thread per
rank; on a 2-core machine more than 2 ranks share the cores, which the table states (then
a rank's idle time is another rank's CPU time, and filling bubbles cannot shorten a step).

First, without running a model, the simulated step of the same schedule (and of larger
ones) with the recompute after the schedule vs inside the bubbles (parallel/dep_bubbles.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def simulated(pp: int, vpp: int, microbatches: int) -> None:
    from parallel.dep_bubbles import makespans
    from parallel.schedule import schedule
    from parallel.schedule_sim import format_timeline

    print("Simulated step up to the encoder backward (F=1, B=2 units; R = the recompute of a "
          "rank's media share, in units of one chunk forward; rendezvous p2p)\n")
    print(f"{'pp':>4}{'vpp':>5}{'m':>5}{'R':>5}{'pipeline':>10}{'R after':>9}{'R inside':>10}"
          f"{'hidden':>8}")
    shapes = [(pp, vpp, microbatches), (2, 2, 8), (4, 2, 16), (8, 2, 32), (16, 2, 64)]
    for p, v, m in dict.fromkeys(shapes):
        for r in (0.5, 1.0, 2.0, 4.0):
            after, inside, sim = makespans(schedule(p, v, m), p, v, recompute_cost=r)
            pipeline = after - r
            print(f"{p:>4}{v:>5}{m:>5}{r:>5.1f}{pipeline:>10.1f}{after:>9.1f}{inside:>10.1f}"
                  f"{(after - inside) / r:>8.0%}")
    _, _, sim = makespans(schedule(pp, vpp, microbatches), pp, vpp)
    print(f"\npp={pp} vpp={vpp} m={microbatches}, R=1 (3 characters a unit, `.` idle):\n"
          f"{format_timeline(sim)}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=4,
                        help="even: each DEP placement then sees every step's data equally")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--max-side", type=int, default=16, help="largest image side in patches")
    parser.add_argument("--media-per-seq", type=int, default=2)
    args = parser.parse_args()
    simulated(args.pp, 1, args.global_batch // args.dp)
    nproc = args.pp * args.dp
    base = (f"--config configs/tiny.toml --data.uri synthetic --parallel.pp {args.pp} --parallel.dp {args.dp} "
            f"--train.global_batch {args.global_batch} --train.micro_batch 1 "
            f"--data.seq_len {args.seq_len} --data.max_image_patches_side {args.max_side} "
            f"--data.media_per_seq {args.media_per_seq} --job.run_dir {tempfile.mkdtemp()}")
    out = Path(tempfile.mkdtemp()) / "dep.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               PYTHONWARNINGS="ignore::UserWarning")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                    "--standalone",
                    "-m", "benchmarks.dep_worker", "--out", str(out), "--steps", str(args.steps),
                    "--rounds", str(args.rounds), "--base", base], cwd=ROOT, env=env, check=True)
    results = json.loads(out.read_text())
    text = results["text-only"]["tokens_per_s"]
    cores = os.cpu_count()
    print(f"\nDEP benchmark: tiny model, pp={args.pp} dp={args.dp} ({nproc} ranks, 1 thread each, "
          f"{cores} cores), {args.global_batch} x {args.seq_len} LM tokens/step, "
          f"{args.rounds} interleaved rounds, median over the timed steps\n")
    print(f"{'mode':<36}{'LM tokens/s':>12}{'vs text-only':>14}{'step s':>9}{'p25..p75 s':>14}"
          f"{'steps':>7}{'DEP after sched. s':>20}{'patches/step':>14}{'load max/mean':>15}")
    for mode, r in results.items():
        ratio = r["tokens_per_s"] / text
        load = f"{r['load_max_over_mean']:.2f}" if r["patches_per_step"] else "-"
        spread = "{:.3f}..{:.3f}".format(*r["step_p25_p75_s"])
        after = r["dep_after_schedule_s"]
        after = f"{after:.3f}" if after is not None else "-"
        print(f"{mode:<36}{r['tokens_per_s']:>12.0f}{ratio:>13.0%}{r['step_time_s']:>9.3f}"
              f"{spread:>14}{r['steps_timed']:>7}{after:>20}{r['patches_per_step']:>14.0f}"
              f"{load:>15}")
    print("\nDEP after sched.: the DEP work after the pipeline schedule (gradients back + "
          "encoder backward, + the recompute when it is not in a bubble), slowest rank, median")


if __name__ == "__main__":
    main()
