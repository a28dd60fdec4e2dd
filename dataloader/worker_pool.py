"""Loader worker processes: planned rows and media in, arrays out, fetched by task id.

    main: plan step n ─► task queue ─► worker 0..W-1: Materializer.row(plans)     ─► result queue
          (prefetch steps ahead)                      or Materializer.media(request)   │
    main: wait for step n's tasks by id ◄──────────────────────────────────────────────┘
                                         arrays: the worker's shared-memory arena ──────┘

The arrays of a result (token rows, uint8 patches) do not go through the queue's pipe:
each worker writes them into its own ring of shared memory and the message carries
only where they are; the main process copies them out as the message arrives (one copy
instead of pickling, a pipe and unpickling: ~10x less per 150 KB item measured here).
A result that does not fit in the free part of the ring is pickled as before.

A worker that raises sends the traceback back and the main process re-raises it; a
worker that dies (killed, segfault) is detected while waiting and reported with its
exit code. Nothing fails silently. A worker whose main process died (killed, no chance
to close the pool) notices within a second and exits, so no orphan keeps running: the
pool holds the write end of a pipe that nobody writes, the workers poll its read end
(EOF: the main process is gone; spawn and forkserver pass only the read end), and with
fork, where every child inherits both ends, the main process is the workers' parent.

Workers start clean and light: with spawn and forkserver, multiprocessing re-imports the
parent's main module in every child (for `-m launch.train`: the trainer, torch, the
model: seconds and ~200 MB per worker before its first sample). The worker side of the
loader needs none of it (dataloader/materialize.py is torch-free), so the pool hides
`__main__` while it starts its processes.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
import types
from contextlib import contextmanager
from multiprocessing import shared_memory

import numpy as np

ARENA_BYTES = 64 << 20  # per worker: results made but not yet taken by the main process


@dataclasses.dataclass(frozen=True)
class _InArena:
    """Where an array of a result sits in its worker's arena (absolute ring position)."""

    start: int
    shape: tuple
    dtype: str


def _map_arrays(result, fn):
    """`result` (a dataclass of arrays and lists of arrays) with fn applied to each array."""
    changes = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, (np.ndarray, _InArena)):
            changes[f.name] = fn(value)
        elif isinstance(value, list) and value and isinstance(value[0], (np.ndarray, _InArena)):
            changes[f.name] = [fn(v) for v in value]
    return dataclasses.replace(result, **changes)


class _ArenaWriter:
    """The worker's side of its ring: one writer; the main process frees in write order."""

    def __init__(self, name: str, consumed):
        # attaching registers the name with the resource tracker the worker shares with the
        # main process, which unlinks it (and so unregisters it) when the pool closes
        self.shm = shared_memory.SharedMemory(name=name)
        self.size, self.consumed, self.written = self.shm.size, consumed, 0

    def put(self, array: np.ndarray):
        n = array.nbytes
        at = self.written % self.size
        pad = self.size - at if at + n > self.size else 0  # an array never wraps
        if n == 0 or pad + n > self.size - (self.written - self.consumed.value):
            return array  # no room now: this one travels pickled
        start = self.written + pad
        np.ndarray(array.shape, array.dtype, buffer=self.shm.buf, offset=start % self.size)[...] = array
        self.written = start + n
        return _InArena(start, array.shape, array.dtype.str)


def _worker_main(worker_id: int, init: dict, tasks, results, main_alive, arena: str, consumed) -> None:
    # a worker is one of several processes per core: no tokenizer threads inside it
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from dataloader.materialize import make_materializer  # torch-free: workers never load torch

    try:
        materializer = make_materializer(init["cfg"], init["seed"], init["tokenizer_bytes"],
                                         init["version"])
        writer = _ArenaWriter(arena, consumed)
    except Exception:
        results.put((None, "error", f"worker {worker_id} failed to start:\n{traceback.format_exc()}",
                     worker_id))
        return
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if main_alive.poll() or os.getppid() != parent:  # the main process is gone
                results.cancel_join_thread()  # nobody reads them: exit without flushing
                return
            continue
        if task is None:  # exit flushes results still buffered; close() reads and drops them
            return
        task_id, kind, payload = task
        try:
            work = materializer.row if kind == "row" else materializer.media
            results.put((task_id, "ok", _map_arrays(work(payload), writer.put), worker_id))
        except Exception:
            results.put((task_id, "error", f"worker {worker_id}, task {task_id}:\n{traceback.format_exc()}",
                         worker_id))


class WorkerError(RuntimeError):
    pass


@contextmanager
def _without_main_module():
    """Processes started in here do not re-import the parent's __main__ (spawn, forkserver).

    multiprocessing reads sys.modules["__main__"] when it starts a process to tell the
    child what to import; a bare module tells it nothing. The target function is found by
    its own module (dataloader.worker_pool), so the workers lose nothing."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def start_server(start_method: str) -> None:
    """Starts the forkserver now, without waiting for it (forkserver start method only).

    A forkserver is a fresh interpreter that imports the worker side of the loader before it
    forks the first worker: ~0.5 s, and `Process.start()` blocks until that fork. Started at
    the top of the loader's constructor, it boots while the main process opens the dataset
    (S3 client, manifest, indexes), so the workers no longer wait in line behind that. Once
    per process: later pools reuse the running server."""
    if start_method == "forkserver":
        from multiprocessing import forkserver

        mp.get_context("forkserver").set_forkserver_preload(["dataloader.materialize"])
        forkserver.ensure_running()


class WorkerPool:
    def __init__(self, num_workers: int, start_method: str, init: dict, stall_timeout_s: float = 600.0):
        # forkserver (default): workers fork from a clean single-threaded server, so a lock
        # held by some thread of the trainer at fork time cannot deadlock them
        ctx = mp.get_context(start_method)
        start_server(start_method)
        self.stall_timeout_s = stall_timeout_s
        self._tasks = ctx.Queue()
        self._results = ctx.Queue()
        alive_r, self._alive_w = ctx.Pipe(duplex=False)  # never written: EOF when we die
        self._arenas = [shared_memory.SharedMemory(create=True, size=ARENA_BYTES) for _ in range(num_workers)]
        self._consumed = [ctx.Value("q", 0, lock=False) for _ in range(num_workers)]
        self._procs = [ctx.Process(target=_worker_main,
                                   args=(i, init, self._tasks, self._results, alive_r, self._arenas[i].name,
                                         self._consumed[i]),
                                   daemon=True, name=f"loader-worker-{i}") for i in range(num_workers)]
        with _without_main_module():
            for p in self._procs:
                p.start()
        alive_r.close()  # the workers have theirs
        self._done: dict = {}

    def submit(self, task_id, kind: str, payload) -> None:
        """kind "row": payload is a row's plans; "media": a MediaRequest."""
        self._tasks.put((task_id, kind, payload))

    def get(self, task_id):
        waited = 0.0
        while task_id not in self._done:
            try:
                tid, status, payload, worker = self._results.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                if waited > self.stall_timeout_s:
                    raise WorkerError(f"no result from the loader workers for {waited:.0f} s "
                                      f"(task {task_id}); they are alive but stuck")
                for i, p in enumerate(self._procs):
                    if not p.is_alive():
                        raise WorkerError(f"loader worker {i} died with exit code {p.exitcode}")
                continue
            if status == "error":
                raise WorkerError(payload)
            self._done[tid] = _map_arrays(payload, lambda a: self._take(worker, a))
        return self._done.pop(task_id)

    def _take(self, worker: int, array):
        """An array of a result, out of the worker's arena (which it then frees)."""
        if isinstance(array, np.ndarray):
            return array
        arena = self._arenas[worker]
        out = np.ndarray(array.shape, np.dtype(array.dtype), buffer=arena.buf,
                         offset=array.start % arena.size).copy()
        self._consumed[worker].value = array.start + out.nbytes
        return out

    def close(self) -> None:
        """Stops the workers; results still in flight are drained and dropped."""
        for _ in self._procs:
            try:
                self._tasks.put(None)
            except (ValueError, OSError):
                pass
        deadline = time.monotonic() + 5.0
        for p in self._procs:
            while p.is_alive() and time.monotonic() < deadline:
                try:  # a worker blocked writing a result to a full pipe needs a reader
                    self._results.get(timeout=0.02)
                except (queue.Empty, OSError, ValueError, EOFError):
                    pass
                p.join(timeout=0.02)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self._procs = []
        self._alive_w.close()
        for arena in self._arenas:
            arena.close()
            arena.unlink()
        self._arenas = []
