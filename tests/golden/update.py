"""Rewrite the golden files: python -m tests.golden.update [--which NAME[,NAME...]]

Runs each reference job of tests/golden/runs.py (all by default) and writes
tests/golden/<name>_fp32_cpu.json; prints, per file, what changed against the old one.

When a rewrite is legitimate: only in a commit that is MEANT to change the numbers of an
fp32 CPU run, and whose message names that change and why the numbers move, e.g.

    - a numerical change on purpose: another reduction order, a fused kernel, a different
      initialisation, a bug fix in the model, optimizer or loss;
    - a change of what the runs train on: the tiny preset, configs/tiny.toml, the demo
      dataset builder or the packages it reads (the file records the dataset's sha256);
    - a torch version bump (the project pins torch; the file records the version).

Not legitimate: rewriting to make a refactor pass. A refactor (ZeRO-1 rebuild, EP overlap,
GPU kernels behind the CPU path, a reworked DEP) that claims to keep fp32 CPU numerics
must leave these files untouched and pass `pytest -k golden` as they are; a difference it
causes is a bug or an undeclared numerical change. Rewrite on the machine kind recorded
in the files (tests/golden/runs.py: `machine()`), one thread per rank, with nothing else
of ours modified in the working tree.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile

from tests.golden.runs import (RUNS, build_demo_dataset, differences, execute, golden_path,
                               likely_causes, write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--which", default=",".join(RUNS),
                        help=f"comma-separated golden runs (default: all of {', '.join(RUNS)})")
    args = parser.parse_args(argv)
    names = [n for n in args.which.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown golden run(s) {unknown}: choose from {', '.join(RUNS)}")
    with tempfile.TemporaryDirectory(prefix="k25-golden-") as work:
        data_dir = None
        if any(RUNS[n].data == "demo" for n in names):
            data_dir = str(build_demo_dataset(f"{work}/demo"))
        for name in names:
            print(f"running golden {name}: {RUNS[name].about}", flush=True)
            record = execute(name, data_dir, work)
            path = golden_path(name)
            old = json.loads(path.read_text()) if path.exists() else None
            changes = (differences(old, record) + likely_causes(old, record) if old
                       else ["new file"])
            write(record)
            print(f"wrote {path}: " + ("unchanged" if not changes else
                                       "\n  " + "\n  ".join(changes)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
