"""DEP vs colocated vision encoder vs text-only training: one run, same machine, same LM tokens.

    python benchmarks/dep.py [--nproc 4] [--pp 2] [--dp 2] [--steps 4]

Prints LM tokens/s of text-only training, of multimodal training with DEP and
with the encoder colocated on pipeline stage 0, the multimodal/text-only ratios
(the Kimi K2.5 report's figure for DEP is 90%), and the per-rank encoder load
(max/mean patch count over all ranks). The data has a realistic skew: mostly
small images, a few large ones, some 4-frame chunks (synthetic generator).
One thread per rank; on a 2-core machine more than 2 ranks share the cores,
which the table states.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--max-side", type=int, default=16, help="largest image side in patches")
    parser.add_argument("--media-per-seq", type=int, default=2)
    args = parser.parse_args()
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
                    "--base", base], cwd=ROOT, env=env, check=True)
    results = json.loads(out.read_text())
    text = results["text-only"]["tokens_per_s"]
    cores = os.cpu_count()
    print(f"\nDEP benchmark: tiny model, pp={args.pp} dp={args.dp} ({nproc} ranks, 1 thread each, "
          f"{cores} cores), {args.global_batch} x {args.seq_len} LM tokens/step, "
          f"median of {args.steps} steps\n")
    print(f"{'mode':<24}{'LM tokens/s':>12}{'vs text-only':>14}{'step s':>9}"
          f"{'patches/step':>14}{'encoder load max/mean':>23}")
    for mode, r in results.items():
        ratio = r["tokens_per_s"] / text
        load = f"{r['load_max_over_mean']:.2f}" if r["patches_per_step"] else "-"
        print(f"{mode:<24}{r['tokens_per_s']:>12.0f}{ratio:>13.0%}{r['step_time_s']:>9.2f}"
              f"{r['patches_per_step']:>14}{load:>23}")


if __name__ == "__main__":
    main()
