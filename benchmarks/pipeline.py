"""Benchmark: plain 1F1B (vpp=1) against interleaved 1F1B (vpp=2), measured and simulated.

    python -m benchmarks.pipeline [--out runs/bench_pipeline] [--pp 2] [--vpps 1,2]
                                  [--microbatches 8] [--layers 8] [--warmup 1] [--steps 3]
                                  [--torch-profile] [--a.b value ...]  (job-config overrides)

Same model, global batch and microbatches for every layout; only the number of chunks
per rank changes. Each layout runs in its own torchrun launch (benchmarks/pipeline_worker.py,
one thread per rank) so that peak RSS is the layout's own. Printed, one row per layout:

    step ms          median over the timed steps of the slowest rank's step time
    bubble measured  median over the timed steps of trainer.profile.measured_bubble_fraction
    bubble replay    median of trainer.profile.replayed_bubble_fraction: the simulator fed
                     with each step's measured forward/backward durations, no communication
    bubble sim       parallel.schedule_sim.simulate on the same (pp, vpp, m), F=1, B=2
                     (for 1F1B and interleaved 1F1B: (pp-1) / (vpp*m))

The measured bubble exceeds the simulated one where stages are unequal (stage 0 runs the
vision encoder and embedding, the last stage the LM head and loss: replay - sim), and where
receives wait on communication and by the runtime's Python overhead between actions
(measured - replay; never negative, the spans share one clock). For the last timed
step of each layout it writes `vpp{v}_trace.json` (Chrome trace: chrome://tracing or
ui.perfetto.dev), `vpp{v}_gantt.png` and `vpp{v}_stages.txt` (per-rank table) into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from parallel.schedule import schedule
from parallel.schedule_sim import simulate
from trainer.profile import (RankInfo, Span, format_columns, format_table, gantt_png,
                             measured_bubble_fraction, replayed_bubble_fraction, slowest_stage,
                             stage_table, write_chrome_trace)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LayoutResult:
    """What one worker launch measured, with spans indexed [timed step][rank]."""

    pp: int
    vpp: int
    microbatches: int
    infos: list[RankInfo]
    peak_memory_per_rank: list[int]
    step_times_per_rank: list[list[float]]
    spans_per_step: list[list[list[Span]]]

    @classmethod
    def load(cls, path: str | os.PathLike) -> LayoutResult:
        data = json.loads(Path(path).read_text())
        ranks = data["ranks"]
        steps = len(ranks[0]["spans_per_step"])
        return cls(
            pp=data["pp"], vpp=data["vpp"], microbatches=data["microbatches"],
            infos=[RankInfo(**r["info"]) for r in ranks],
            peak_memory_per_rank=[r["peak_memory_bytes"] for r in ranks],
            step_times_per_rank=[r["step_times"] for r in ranks],
            spans_per_step=[[[Span.from_dict(d) for d in r["spans_per_step"][step]]
                             for r in ranks] for step in range(steps)])

    def step_times(self) -> list[float]:
        """Per timed step, the slowest rank's time: the step is done when every rank is."""
        return [max(times) for times in zip(*self.step_times_per_rank)]

    def bubbles(self) -> list[float]:
        return [measured_bubble_fraction(spans) for spans in self.spans_per_step]

    def replayed_bubbles(self) -> list[float]:
        return [replayed_bubble_fraction(spans, self.infos, self.pp, self.vpp, self.microbatches)
                for spans in self.spans_per_step]


def simulated_bubble(pp: int, vpp: int, microbatches: int) -> float:
    return simulate(schedule(pp, vpp, microbatches), pp, vpp,
                    microbatches=microbatches).bubble_fraction


def run_layout(result_path: Path, nproc: int, worker_args: list[str],
               timeout_s: float = 900) -> LayoutResult:
    """Launch the worker under torchrun on this machine (gloo, one thread per rank).

    `--standalone` lets the rendezvous bind its own free port, so two launches on a shared
    machine cannot race for one picked in advance.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               PYTHONWARNINGS="ignore::UserWarning")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc),
           "-m", "benchmarks.pipeline_worker", "--out", str(result_path), *worker_args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline worker failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return LayoutResult.load(result_path)


def comparison_table(results: list[LayoutResult]) -> str:
    header = ("schedule", "pp", "vpp", "m", "step ms", "bubble measured", "bubble replay",
              "bubble sim", "slowest rank", "recv wait ms", "peak MiB")
    lines = []
    for r in results:
        last = r.spans_per_step[-1]
        rows = stage_table(last, r.peak_memory_per_rank)
        slow = slowest_stage(rows)
        lines.append((
            "1F1B" if r.vpp == 1 else "interleaved 1F1B", str(r.pp), str(r.vpp),
            str(r.microbatches), f"{statistics.median(r.step_times()) * 1e3:.0f}",
            f"{statistics.median(r.bubbles()):.3f}",
            f"{statistics.median(r.replayed_bubbles()):.3f}",
            f"{simulated_bubble(r.pp, r.vpp, r.microbatches):.3f}",
            f"{slow['rank']} ({slow['compute_s'] * 1e3:.0f} ms)",
            f"{max(row['comm_wait_s'] for row in rows) * 1e3:.0f}",
            f"{max(r.peak_memory_per_rank) / 2**20:.0f}"))
    return format_columns(header, lines)


def write_artifacts(result: LayoutResult, out_dir: Path) -> list[Path]:
    """Trace, Gantt chart and per-rank table of the layout's last timed step."""
    spans = result.spans_per_step[-1]
    name = f"vpp{result.vpp}"
    title = (f"pp={result.pp} vpp={result.vpp} m={result.microbatches}: measured bubble "
             f"{measured_bubble_fraction(spans):.3f}, simulated "
             f"{simulated_bubble(result.pp, result.vpp, result.microbatches):.3f}")
    meta = {"pp": result.pp, "vpp": result.vpp, "microbatches": result.microbatches}
    table = out_dir / f"{name}_stages.txt"
    table.write_text(format_table(stage_table(spans, result.peak_memory_per_rank)) + "\n")
    return [write_chrome_trace(out_dir / f"{name}_trace.json", spans, result.infos, meta),
            gantt_png(spans, out_dir / f"{name}_gantt.png", title, result.infos), table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_pipeline")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--vpps", default="1,2", help="comma-separated virtual stages per rank")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8, help="LM layers (pp*vpp must divide)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--torch-profile", action="store_true",
                        help="also export per-rank torch.profiler traces to OUT/torch_vpp<v>/")
    args, overrides = parser.parse_known_args(argv)
    vpps = [int(v) for v in args.vpps.split(",")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for vpp in vpps:
        worker_args = ["--warmup", str(args.warmup), "--steps", str(args.steps),
                       "--parallel.pp", str(args.pp), "--parallel.vpp", str(vpp),
                       "--train.micro_batch", "1", "--train.global_batch", str(args.microbatches),
                       "--model.lm.layers", str(args.layers), "--data.seq_len", str(args.seq_len),
                       "--data.uri", "synthetic",
                       *overrides]
        if args.torch_profile:
            worker_args += ["--torch-profile", str(out_dir / f"torch_vpp{vpp}")]
        results.append(run_layout(out_dir / f"vpp{vpp}_result.json", args.pp, worker_args))
    print(comparison_table(results))
    for result in results:
        written = write_artifacts(result, out_dir)
        print(f"vpp={result.vpp}: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
