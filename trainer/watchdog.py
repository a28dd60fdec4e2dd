"""Progress watchdog: a rank that makes no progress for `job.step_timeout_s` says where it
waits, and the job exits non-zero so `torchrun --max-restarts` can bring it back.

A frozen or dead rank leaves every other rank blocked in a collective; without this, a
job waits silently until the collective timeout (30 min by default in gloo), or forever
in code that has none. The trainer calls `progress(what)` at each phase of a step (data,
forward/backward/optimizer, checkpoint); a daemon thread checks the time since the last
call:

    main thread:  progress("step 7: reading data") ... progress("step 7: forward, ...") ...
    watchdog:     every min(1 s, timeout/10): now - last > timeout ?
                    1. log: "rank 3 made no progress for 60 s; waiting in: step 7: forward,
                       ..." and the main thread's Python stack (where exactly it waits)
                    2. append "3," to one key of the job's store; wait `grace_s`; read it:
                       "ranks waiting: 0-1,3; no report from rank 2" (the frozen one names
                       itself by its silence); one append and one get per rank, only on
                       this failure path
                    3. write torchrun's error file (its failure summary shows the message)
                       and os._exit(EXIT_CODE): the main thread is stuck in C++ and cannot
                       be interrupted, so nothing else would end the process

Start-up phases (building the model, opening the data, loading a checkpoint) are named
but not timed (`timed=False`): their length grows with the model and the cluster, and
their collectives are bounded by job.collective_timeout_s. Known limit: the timeout is
per phase, so it must exceed the slowest step phase (the first step, a checkpoint save of
a large model). 0 disables the watchdog.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback

EXIT_CODE = 124  # as timeout(1)
STORE_KEY = "watchdog/waiting"


class WatchdogTimeout(RuntimeError):
    pass


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ",".join(out) or "none"


class Watchdog:
    def __init__(self, timeout_s: float, rank: int = 0, world: int = 1):
        self.timeout_s, self.rank, self.world = timeout_s, rank, world
        # how long to wait for the other ranks' reports: they time out within about one step
        # of each other
        self.grace_s = min(30.0, max(2.0, timeout_s / 5))
        self.store = None
        self._what, self._last, self._timed = "start-up", time.monotonic(), False
        self._stop = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._run, name="k25-watchdog", daemon=True)
            self._thread.start()

    def attach_store(self, store) -> None:
        """The job's c10d store (a clone: its own connection, so the thread never shares the
        main thread's client)."""
        self.store = store.clone() if store is not None else None

    def progress(self, what: str, timed: bool = True) -> None:
        """The rank starts `what`; `timed`: whether the timeout applies to it."""
        self._what, self._last, self._timed = what, time.monotonic(), timed

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        tick = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(tick):
            idle = time.monotonic() - self._last
            if self._timed and idle > self.timeout_s:
                self._fire(idle)

    def _main_stack(self) -> str:
        frame = sys._current_frames().get(self._main)
        if frame is None:
            return ""
        return "".join(traceback.format_stack(frame)[-8:])

    def _fire(self, idle: float) -> None:
        message = (f"watchdog: rank {self.rank} made no progress for {idle:.0f} s "
                   f"(job.step_timeout_s={self.timeout_s:g}); it is waiting in: {self._what}")
        print(f"{message}\nwhere (main thread, innermost last):\n{self._main_stack()}",
              file=sys.stderr, flush=True)
        summary = self._job_summary()
        if summary:
            message += f"\n{summary}"
            print(summary, file=sys.stderr, flush=True)
        print(f"watchdog: rank {self.rank} exits with code {EXIT_CODE} so that torchrun "
              "--max-restarts can restart the job", file=sys.stderr, flush=True)
        try:  # torchrun's failure summary reads it
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(WatchdogTimeout(message))
        except Exception:
            pass
        os._exit(EXIT_CODE)

    def _job_summary(self) -> str:
        """Which ranks report being stuck too, and which do not answer (the suspects)."""
        if self.store is None or self.world <= 1:
            return ""
        try:
            self.store.append(STORE_KEY, f"{self.rank},")
            time.sleep(self.grace_s)
            raw = self.store.get(STORE_KEY).decode()
        except Exception as e:  # the store lives in the torchrun agent, which may be gone
            return f"watchdog: cannot reach the job's store to compare with other ranks ({e})"
        waiting = sorted({int(r) for r in raw.split(",") if r})
        silent = sorted(set(range(self.world)) - set(waiting))
        return (f"watchdog: ranks waiting: {_ranges(waiting)}; no report within "
                f"{self.grace_s:g} s from rank(s) {_ranges(silent)}: frozen, dead or busy "
                "elsewhere (see their logs/rank<r>.log)")
