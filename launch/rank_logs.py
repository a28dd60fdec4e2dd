"""Per-rank log files: rank 0 writes to the console and logs/rank0.log, the others only to files.

Hundreds of ranks printing to one console bury the one line that matters; a
failing rank's traceback still reaches the console through torchrun's error
summary (`launch.train.main` is wrapped with torch elastic's `record`).

A log file that cannot be written (the disk is full) is dropped with one note on the
console, which then gets that rank's output: the message that explains the failure
must not be lost with the log.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO


class _Tee:
    def __init__(self, *streams: TextIO):
        self.streams = list(streams)

    def _each(self, call) -> None:
        for stream in list(self.streams):
            try:
                call(stream)
            except OSError as e:
                if stream in (sys.__stdout__, sys.__stderr__):
                    raise
                self.streams.remove(stream)
                sys.__stderr__.write(f"cannot write {getattr(stream, 'name', 'the log')} "
                                     f"({e.strerror}); this rank's output goes to the console\n")
                if sys.__stderr__ not in self.streams and sys.__stdout__ not in self.streams:
                    self.streams.append(sys.__stderr__)
                    call(sys.__stderr__)

    def write(self, text: str) -> int:
        self._each(lambda stream: stream.write(text))
        return len(text)

    def flush(self) -> None:
        self._each(lambda stream: stream.flush())

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
        sys.stdout = sys.stderr = _Tee(log)
    return path
