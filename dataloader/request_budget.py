"""One request budget per node, shared by every loader process of that node.

The budget is a token bucket (`requests_per_s`, burst of one request, so requests are
spaced at least 1/rate apart and any 1 s window holds at most rate + 1 of them) plus a
cap on concurrent requests. Its state lives in a node-local folder and is guarded by
`flock`: the kernel drops a dead process's locks, so a crash never leaves the budget
stuck, and there is no lock file to clean up.

    process A ─┐  flock(budget.lock): read tokens, refill by elapsed time, take one
    process B ─┼─►  slot-k.lock (one of max_concurrent) held for the request's duration
    process C ─┘
"""
from __future__ import annotations

import fcntl
import os
import struct
import time
from contextlib import contextmanager

from dataloader.store import atomic_write, private_dir

_STATE = struct.Struct("<ddq")  # tokens, last refill (time.time()), tokens granted so far


class RequestBudget:
    def __init__(self, folder: str, requests_per_s: float, max_concurrent: int):
        if requests_per_s <= 0 or max_concurrent <= 0:
            raise ValueError("request budget needs requests_per_s > 0 and max_concurrent > 0")
        private_dir(folder)
        self.folder, self.rate, self.max_concurrent = folder, float(requests_per_s), int(max_concurrent)
        self._state_path = os.path.join(folder, "budget.state")
        self._lock_path = os.path.join(folder, "budget.lock")
        self.waited_s = 0.0

    def __getstate__(self):  # picklable into worker processes
        return {"folder": self.folder, "rate": self.rate, "max_concurrent": self.max_concurrent}

    def __setstate__(self, s):
        self.__init__(s["folder"], s["rate"], s["max_concurrent"])

    def _take_token(self) -> float:
        """Takes a token and returns 0, or returns how long to wait for one."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            now = time.time()
            tokens, last, granted = self._read_state(now)
            tokens = min(1.0, tokens + max(0.0, now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
                granted += 1
            else:
                wait = (1.0 - tokens) / self.rate
            atomic_write(self._state_path, _STATE.pack(tokens, now, granted))
            return wait
        finally:
            os.close(fd)  # releases the flock

    def _read_state(self, now: float) -> tuple[float, float, int]:
        try:
            with open(self._state_path, "rb") as f:
                return _STATE.unpack(f.read(_STATE.size))
        except (FileNotFoundError, struct.error):  # first use, or a state of an older layout
            return 1.0, now, 0

    def granted(self) -> int:
        """Requests the node's processes have started under this budget so far (all of them,
        retries included): what tests compare with the requests the store saw."""
        return self._read_state(time.time())[2]

    @contextmanager
    def request(self):
        """Holds one concurrency slot and one token for the duration of a request."""
        slot_fd = self._acquire_slot()
        try:
            while True:
                wait = self._take_token()
                if wait == 0.0:
                    break
                self.waited_s += wait
                time.sleep(wait)
            yield
        finally:
            os.close(slot_fd)

    def _acquire_slot(self) -> int:
        delay = 0.001
        while True:
            for k in range(self.max_concurrent):
                fd = os.open(os.path.join(self.folder, f"slot-{k}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    os.close(fd)
            time.sleep(delay)
            self.waited_s += delay
            delay = min(0.05, delay * 2)
