"""Training runs of the GPU check (benchmarks/gpu_check.sh): one table, written to --out.

    python benchmarks/gpu_check.py --out runs/gpu_check

Runs `small` on one GPU through the real entry point (launch.train, --job.device cuda,
synthetic data), each variant in its own process:

    curves      fp32 and bf16, 50 steps: the loss curves side by side (every 5 steps)
    throughput  bf16 without and with transformer-engine (when installed), 20 steps:
                median tokens/s, model TFLOP/s, MFU and peak memory after 5 warm-up steps

Prints a markdown table and writes it to <out>/gpu_check.md (curves as JSON beside it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CURVE = ["--data.seq_len", "2048", "--train.global_batch", "8", "--train.micro_batch", "2",
         "--train.steps", "50"]
THROUGHPUT = ["--data.seq_len", "4096", "--train.global_batch", "16", "--train.micro_batch", "2",
              "--train.steps", "20"]
WARMUP = 5


def run(name: str, out: Path, args: list[str]) -> list[dict] | str:
    run_dir = out / name
    cmd = [sys.executable, "-m", "launch.train", "--config", "configs/tiny.toml",
           "--model.preset", "small", "--data.uri", "synthetic", "--job.device", "cuda",
           "--job.tensorboard", "false", "--job.log_every", "10", "--job.run_dir", str(run_dir),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return (proc.stderr or proc.stdout).strip().splitlines()[-1][:160]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def te_installed() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/gpu_check")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| run | result | tokens/s | TFLOP/s | MFU | peak GiB | final loss |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    curves = {}
    variants = [("fp32 curve", CURVE + ["--train.dtype", "fp32"]),
                ("bf16 curve", CURVE + ["--train.dtype", "bf16"]),
                ("bf16 throughput", THROUGHPUT + ["--train.dtype", "bf16"])]
    if te_installed():
        variants.append(("bf16 + TE throughput", THROUGHPUT + ["--train.dtype", "bf16",
                                                               "--model.te", "true"]))
    else:
        lines.append("| bf16 + TE throughput | transformer-engine not installed | | | | | |")
    for name, extra in variants:
        records = run(name.replace(" ", "_"), out, extra)
        if isinstance(records, str):
            lines.append(f"| {name} | failed: {records} | | | | | |")
            continue
        timed = records[WARMUP:] or records
        med = lambda key: statistics.median(r[key] for r in timed if key in r)  # noqa: E731
        mfu = f"{med('mfu'):.1%}" if any("mfu" in r for r in timed) else "n/a"
        peak = max(r.get("peak_memory_bytes", 0) for r in records) / 2**30
        lines.append(f"| {name} | ok, {len(records)} steps | {med('tokens_per_s'):,.0f} | "
                     f"{med('tflops'):.1f} | {mfu} | {peak:.1f} | {records[-1]['loss']:.4f} |")
        if "curve" in name:
            curves[name] = [r["loss"] for r in records]
    if len(curves) == 2:
        lines += ["", "| step | fp32 loss | bf16 loss |", "| --- | --- | --- |"]
        fp32, bf16 = curves["fp32 curve"], curves["bf16 curve"]
        lines += [f"| {s} | {fp32[s]:.4f} | {bf16[s]:.4f} |"
                  for s in range(0, min(len(fp32), len(bf16)), 5)]
    table = "\n".join(lines)
    print(table)
    (out / "gpu_check.md").write_text(table + "\n")
    (out / "curves.json").write_text(json.dumps(curves))
    return 0


if __name__ == "__main__":
    sys.exit(main())
