"""Step time of this checkout against another revision, side by side, interleaved.

    python benchmarks/step_time.py --baseline main --preset tiny small --rounds 3

For each preset, runs `launch.train` (one process, synthetic data, on this machine's
default device) in this checkout (B) and in a temporary git worktree of `--baseline` (A), in
the order A B A B ... over `--rounds` rounds, and reports the median step time after the
warm-up steps of each side, and B / A. This machine is shared and noisy: only medians of
interleaved rounds are worth reading. Extra arguments after `--` go to both runs.
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


def one_run(checkout: Path, preset: str, steps: int, extra: list[str], run_dir: Path) -> list[float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(checkout),
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "launch.train", "--config", "configs/tiny.toml",
           "--model.preset", preset, "--data.uri", "synthetic", "--train.steps", str(steps),
           "--job.tensorboard", "false", "--job.run_dir", str(run_dir), *extra]
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: launch.train failed ({proc.returncode}):\n"
                         f"{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in records]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="main", help="git revision to compare against")
    parser.add_argument("--preset", nargs="+", default=["tiny", "small"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="after --: more launch.train arguments")
    args = parser.parse_args()
    extra = ["--data.seq_len", "256", "--train.global_batch", "4", *args.extra]
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(baseline), args.baseline],
                       cwd=ROOT, check=True)
        try:
            rows = []
            for preset in args.preset:
                times = {"A": [], "B": []}
                for round_ in range(args.rounds):
                    for side, checkout in (("A", baseline), ("B", ROOT)):
                        run_dir = Path(tmp) / f"{preset}_{side}_{round_}"
                        times[side] += one_run(checkout, preset, args.steps, extra,
                                               run_dir)[args.warmup:]
                a, b = statistics.median(times["A"]), statistics.median(times["B"])
                rows.append((preset, a, b))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT)
    print(f"step time, median of {args.rounds} interleaved rounds x {args.steps - args.warmup} "
          f"steps ({' '.join(extra)})")
    print(f"| preset | A: {args.baseline} s | B: this checkout s | B / A |")
    print("| --- | --- | --- | --- |")
    for preset, a, b in rows:
        print(f"| {preset} | {a:.3f} | {b:.3f} | {b / a:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
