"""Per-rank log files: rank 0 writes to the console and logs/rank0.log, the others only to files.

Hundreds of ranks printing to one console bury the one line that matters; a
failing rank's traceback still reaches the console through torchrun's error
summary (`launch.train.main` is wrapped with torch elastic's `record`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO


class _Tee:
    def __init__(self, *streams: TextIO):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


def redirect_rank_output(run_dir: str | Path, rank: int) -> Path:
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"rank{rank}.log"
    log = path.open("a", buffering=1)
    if rank == 0:
        sys.stdout, sys.stderr = _Tee(sys.__stdout__, log), _Tee(sys.__stderr__, log)
    else:
        sys.stdout = sys.stderr = log
    return path
