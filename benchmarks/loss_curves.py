"""Benchmark: the `tiny` loss curve, AdamW vs MuonClip, one process (issue 16).

    python -m benchmarks.loss_curves [--steps 200] [--data data/demo] [--out docs/...png]
                                     [--run-dir runs/loss_curves] [--plot-only]

Trains configs/tiny.toml (demo data, the same seed, batches and LR schedule) once with
`--optim.name adamw` and once with `--optim.name muonclip` (tau default 100), each in its
own process (one thread, bitwise reproducible; the two run at the same time), and draws
both losses per step (and their 10-step moving averages) into one PNG. Prints a table: the
loss at a few steps, the mean of the last 20, and the median step time. The step times
are rough (both runs share the machine, with whatever else runs on it);
benchmarks/optimizer.py measures the optimizer step, interleaved. `--plot-only` draws
what the runs' metrics.jsonl files in --run-dir hold (e.g. runs cut short) without training.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from trainer.config import load_config
from trainer.profile import format_columns
from trainer.train import train

OPTIMIZERS = ("adamw", "muonclip")


def run(optimizer: str, steps: int, data: str, run_dir: str) -> None:
    torch.set_num_threads(1)
    cfg = load_config(["--config", "configs/tiny.toml", "--data.uri", data,
                       "--train.steps", str(steps), "--optim.name", optimizer,
                       "--job.run_dir", run_dir, "--job.tensorboard", "false",
                       "--job.log_every", "50"])
    cfg.validate(world_size=1)
    train(cfg)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def moving_average(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def draw(curves: dict[str, list[float]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for (name, losses), colour in zip(curves.items(), ("#4c72b0", "#dd8452")):
        axes.plot(losses, color=colour, alpha=0.3, linewidth=0.8)
        axes.plot(moving_average(losses, 10), color=colour, linewidth=1.8,
                  label=f"{name} (10-step mean)")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (per labelled token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--out", default="docs/loss_tiny_adamw_vs_muonclip.png")
    parser.add_argument("--run-dir", default="runs/loss_curves",
                        help="the runs write <run-dir>/<optimizer>/metrics.jsonl (replaced)")
    parser.add_argument("--plot-only", action="store_true",
                        help="no training: draw what --run-dir holds")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    if not args.plot_only:
        with ProcessPoolExecutor(len(OPTIMIZERS),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in [pool.submit(run, name, args.steps, args.data, str(run_dir / name))
                           for name in OPTIMIZERS]:
                future.result()
    records = {name: read_metrics(run_dir / name) for name in OPTIMIZERS}
    steps = min(len(recs) for recs in records.values())  # runs cut short: the common steps
    records = {name: recs[:steps] for name, recs in records.items()}
    losses = {name: [r["loss"] for r in recs] for name, recs in records.items()}
    marks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
    header = ("optimizer", *(f"loss@{s}" for s in marks), "last-20 mean", "step ms (median)")
    rows = [(name, *(f"{losses[name][s]:.3f}" for s in marks),
             f"{statistics.fmean(losses[name][-20:]):.3f}",
             f"{1e3 * statistics.median(r['step_time_s'] for r in records[name]):.0f}")
            for name in OPTIMIZERS]
    print(f"tiny, {steps} steps, one process per optimizer (1 thread), data {args.data}",
          flush=True)
    print(format_columns(header, rows), flush=True)
    draw(losses, Path(args.out), f"tiny ({steps} steps, demo data, one process): "
                                 f"AdamW vs MuonClip")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
