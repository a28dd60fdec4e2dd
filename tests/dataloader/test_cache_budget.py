"""Cache tiers, the node request budget, and worker failures that must not pass silently."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from dataloader.cache import DiskLRU, MemoryLRU
from dataloader.request_budget import RequestBudget


def test_memory_lru_keeps_the_recent_within_its_size():
    lru = MemoryLRU(10)
    lru.put("a", b"1234")
    lru.put("b", b"1234")
    assert lru.get("a") == b"1234"  # a is now the most recent
    lru.put("c", b"1234")  # over 10 bytes: b (least recent) goes
    assert lru.get("b") is None and lru.get("a") and lru.get("c")


def test_disk_lru_limit_atomic_files_and_stale_temp_cleanup(tmp_path):
    disk = DiskLRU(str(tmp_path), max_bytes=250)
    for i in range(4):
        disk.put(f"shard-{i}", bytes([i]) * 100)
        time.sleep(0.01)
    present = [i for i in range(4) if disk.get(f"shard-{i}") is not None]
    assert present == [2, 3], "oldest objects are evicted to stay under the size limit"
    assert disk.get("shard-3", (10, 20)) == bytes([3]) * 10
    # a writer that died mid-write leaves only its temp file, never a half object
    dead = mp.get_context("fork").Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    stale = disk.path("shard-9") + f".tmp.{dead.pid}"
    with open(stale, "wb") as f:
        f.write(b"partial")
    assert disk.get("shard-9") is None
    DiskLRU(str(tmp_path), max_bytes=250)
    assert not os.path.exists(stale), "temp files of dead writers are removed at start-up"


def _hold_lock_forever(folder, ready):
    disk = DiskLRU(folder, 1 << 20)
    with disk.fetch_lock("shard-0"):
        ready.set()
        time.sleep(60)


def test_fetch_lock_of_a_killed_process_is_released(tmp_path):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock_forever, args=(str(tmp_path), ready))
    holder.start()
    assert ready.wait(10)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    t0 = time.monotonic()
    with DiskLRU(str(tmp_path), 1 << 20).fetch_lock("shard-0"):
        pass
    assert time.monotonic() - t0 < 5, "a crashed holder must not leave a stale lock"


def _spend(folder, rate, n, out):
    budget = RequestBudget(folder, rate, 2)
    for _ in range(n):
        with budget.request():
            out.put(time.monotonic())


def test_budget_is_shared_by_the_processes_of_a_node(tmp_path):
    rate = 40.0
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_spend, args=(str(tmp_path), rate, 12, out)) for _ in range(3)]
    for p in procs:
        p.start()
    times = sorted(out.get(timeout=30) for _ in range(36))
    for p in procs:
        p.join()
    in_window = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
    assert in_window <= rate + 1
    assert times[-1] - times[0] >= (36 - 1) / rate * 0.9, "three processes together keep one rate"


def test_a_killed_worker_is_reported(demo_dir):
    from dataloader.loader import build_loader
    from dataloader.worker_pool import WorkerError
    from tests.dataloader.helpers import tiny_config

    loader = build_loader(tiny_config(demo_dir, workers=1, prefetch=1), seed=0, dp_rank=0, dp_size=1,
                          rows_per_step=1)
    next(loader)
    os.kill(loader._pool._procs[0].pid, signal.SIGKILL)
    with pytest.raises(WorkerError, match="died"):
        for _ in range(10):
            next(loader)
    loader.close()
