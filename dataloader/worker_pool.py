"""Loader worker processes: planned rows and media in, arrays out, fetched by task id.

    main: plan step n ─► task queue ─► worker 0..W-1: Materializer.row(plans)     ─► result queue
          (prefetch steps ahead)                      or Materializer.media(request)   │
    main: wait for step n's tasks by id ◄──────────────────────────────────────────────┘

A worker that raises sends the traceback back and the main process re-raises it; a
worker that dies (killed, segfault) is detected while waiting and reported with its
exit code. Nothing fails silently. A worker whose main process died (killed, no chance
to close the pool) notices within a second and exits, so no orphan keeps running: the
pool holds the write end of a pipe that nobody writes, the workers poll its read end
(EOF: the main process is gone; spawn and forkserver pass only the read end), and with
fork, where every child inherits both ends, the main process is the workers' parent.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback


def _worker_main(worker_id: int, init: dict, tasks, results, main_alive) -> None:
    import torch

    torch.set_num_threads(1)
    from dataloader.loader import make_materializer

    try:
        materializer = make_materializer(init["cfg"], init["seed"], init["tokenizer_bytes"],
                                         init["version"])
    except Exception:
        results.put((None, "error", f"worker {worker_id} failed to start:\n{traceback.format_exc()}"))
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
            results.put((task_id, "ok", work(payload)))
        except Exception:
            results.put((task_id, "error", f"worker {worker_id}, task {task_id}:\n{traceback.format_exc()}"))


class WorkerError(RuntimeError):
    pass


class WorkerPool:
    def __init__(self, num_workers: int, start_method: str, init: dict, stall_timeout_s: float = 600.0):
        # forkserver (default): workers fork from a clean single-threaded server, so a lock
        # held by some thread of the trainer at fork time cannot deadlock them
        ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            ctx.set_forkserver_preload(["dataloader.loader"])
        self.stall_timeout_s = stall_timeout_s
        self._tasks = ctx.Queue()
        self._results = ctx.Queue()
        alive_r, self._alive_w = ctx.Pipe(duplex=False)  # never written: EOF when we die
        self._procs = [ctx.Process(target=_worker_main,
                                   args=(i, init, self._tasks, self._results, alive_r),
                                   daemon=True, name=f"loader-worker-{i}") for i in range(num_workers)]
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
                tid, status, payload = self._results.get(timeout=1.0)
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
            self._done[tid] = payload
        return self._done.pop(task_id)

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
