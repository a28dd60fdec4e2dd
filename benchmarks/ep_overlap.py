"""Expert-parallel all-to-all overlap: step time and exposed all-to-all time, one table.

    python benchmarks/ep_overlap.py [--latency-ms 5 10 20] [--rounds 3] [-- config overrides]

Launches 4 gloo ranks (pp=2 vpp=2 ep=2 dp=2, colocated encoder so DEP's own exchanges do
not mix in) on a widened tiny model, and on one engine alternates the plain schedule and
the overlapped one (parallel.ep_overlap) round by round. A CPU has no network worth
hiding, so the worker emulates one: each token all-to-all takes at least --latency-ms on
the communication side (benchmarks/ep_overlap_worker.py says how). Per configuration:

    step ms              median over timed steps (slowest rank)
    a2a / step           token all-to-alls per rank and step (forward and backward)
    a2a total ms         a2a / step x latency: the emulated network time to hide
    exposed ms           time the compute thread waited on all-to-alls (plain: all of it)
    exposed / total      whole step; steady = inside FB pairs only (warm-up and cool-down
                         passes run alone and cannot hide anything)
    saved / a2a total    (plain step - overlapped step) / a2a total

Medians over the interleaved rounds. The issue's goals: steady exposed / total <= 10%, and
saved / a2a total >= 80%.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ["--config", "configs/tiny.toml", "--data.uri", "synthetic", "--parallel.pp", "2",
          "--parallel.vpp", "2", "--parallel.ep", "2", "--parallel.dp", "2",
          "--parallel.encoder", "colocated", "--train.global_batch", "8",
          "--data.seq_len", "256", "--model.lm.hidden", "512", "--model.lm.expert_hidden", "512",
          "--model.lm.dense_hidden", "1024"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[5.0, 10.0, 20.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="after --: more config overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
                   PYTHONWARNINGS="ignore")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "4", "-m", "benchmarks.ep_overlap_worker", "--out", str(out),
               "--rounds", str(args.rounds), "--steps", str(args.steps), "--latency-ms",
               *map(str, args.latency_ms), *CONFIG, "--job.run_dir", tmp, *args.overrides]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
            return 1
        records = json.loads(out.read_text())
    print(f"pp=2 vpp=2 ep=2 dp=2, 4 microbatches per replica, {args.rounds} interleaved rounds "
          f"x {args.steps} steps; {' '.join(args.overrides)}")
    print("| latency ms | schedule | step ms | a2a / step | a2a total ms | exposed ms | "
          "exposed / total | steady exposed / total | saved / a2a total |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for latency in args.latency_ms:
        rows = {}
        for variant in ("plain", "overlapped"):
            mine = [r for r in records if r["latency_ms"] == latency and r["variant"] == variant]
            rows[variant] = {key: statistics.median(r[key] for r in mine)
                             for key in ("step_s", "a2a", "exposed_s", "paired_a2a",
                                         "paired_exposed_s")}
        for variant, row in rows.items():
            total = row["a2a"] * latency / 1e3
            steady = (row["paired_exposed_s"] / (row["paired_a2a"] * latency / 1e3)
                      if row["paired_a2a"] and latency else float("nan"))
            saved = ((rows["plain"]["step_s"] - row["step_s"]) / total
                     if variant == "overlapped" and total else float("nan"))
            print(f"| {latency:g} | {variant} | {row['step_s'] * 1e3:.0f} | {row['a2a']:.0f} | "
                  f"{total * 1e3:.0f} | {row['exposed_s'] * 1e3:.0f} | "
                  f"{row['exposed_s'] / total if total else float('nan'):.0%} | "
                  f"{steady:.0%} | {saved:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
