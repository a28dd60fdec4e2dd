"""Timestamps for one step's actions and phases, right on every device.

On CPU an action's time is when the host ran it (`time.perf_counter`). On CUDA the host
only enqueues kernels, so host timestamps would measure launch overhead: there each mark
is a CUDA event recorded on the current stream, and after the step (one synchronize)
every event is turned into seconds on the host clock, anchored at the step's start:

    host:    start() ── t0 = perf_counter(), ref event ──> ... enqueue ... ──> resolve()
    stream:            [ref]  [F0.m0 ........] [SEND ..] [F0.m1 ....] ...
    seconds(mark) = t0 + ref.elapsed_time(mark) / 1000

Profiles (trainer/profile.py) and the pipeline idle fraction read these seconds, so
the same code measures CPU and GPU runs.
"""
from __future__ import annotations

import time

import torch


class StepClock:
    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.t0 = 0.0
        self._ref = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record()
        self.t0 = time.perf_counter()

    def mark(self):
        """A token for 'now' on this device: a float on CPU, a recorded event on CUDA."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, mark) -> float:
        """The host-clock time of a mark (call after `resolve`)."""
        if not self.cuda:
            return mark
        return self.t0 + self._ref.elapsed_time(mark) / 1000.0

    def resolve(self) -> None:
        """Wait for the marked work to finish, so every mark has a time."""
        if self.cuda:
            torch.cuda.synchronize()
