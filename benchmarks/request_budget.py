"""Benchmark: does the node request budget pace real processes at its rate?

    python -m benchmarks.request_budget [--rates 20,100] [--processes 1,3] [--seconds 3]

Each row: `processes` processes of one node (one budget folder) take tokens back to back
for about `seconds` s at the given rate. Columns:

    requests      tokens granted (the node's count, dataloader/request_budget.py)
    achieved/s    (requests - 1) / (last grant - first grant)
    max in 1 s    the most grants inside any 1 s window; the token bucket (burst of one)
                  allows rate + 1

These are timing properties, so they live here and not in the tests (which check counts:
tests/dataloader/test_cache_budget.py, tests/dataloader/test_s3.py). Each grant's time is
read just after the token was taken; on a loaded machine a process can be descheduled in
between, which bunches or spreads the recorded times a little.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

from dataloader.request_budget import RequestBudget
from trainer.profile import format_columns


def _spend(folder: str, rate: float, seconds: float, out) -> None:
    budget = RequestBudget(folder, rate, 8)
    stop = time.monotonic() + seconds
    times = []
    while time.monotonic() < stop:
        with budget.request():
            times.append(time.monotonic())
    out.put(times)


def max_in_window(times: list[float], window_s: float = 1.0) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window_s + 1e-9:
            j += 1
        best = max(best, i - j + 1)
    return best


def measure(rate: float, processes: int, seconds: float) -> tuple:
    folder = tempfile.mkdtemp(prefix="k25-bench-budget-")
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_spend, args=(folder, rate, seconds, out))
             for _ in range(processes)]
    for p in procs:
        p.start()
    times = sorted(t for _ in procs for t in out.get(timeout=seconds + 60))
    for p in procs:
        p.join()
    granted = RequestBudget(folder, rate, 8).granted()
    span = times[-1] - times[0]
    return (f"{rate:g}", str(processes), str(granted), f"{(len(times) - 1) / span:.1f}",
            f"{max_in_window(times)} (limit {rate + 1:g})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="20,100", help="comma-separated requests per second")
    parser.add_argument("--processes", default="1,3", help="comma-separated process counts")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    rows = [measure(float(rate), int(n), args.seconds)
            for rate in args.rates.split(",") for n in args.processes.split(",")]
    print(f"node request budget, {os.cpu_count()} cores, {args.seconds:g} s per row")
    print(format_columns(("rate/s", "processes", "requests", "achieved/s", "max in 1 s"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
