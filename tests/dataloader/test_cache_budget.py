"""Cache tiers, the node request budget, and worker failures that must not pass silently."""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import threading
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


def test_disk_lru_lists_its_folder_rarely_and_keeps_the_limit(tmp_path, monkeypatch):
    """Eviction lists the folder, so not on every put: only when the running estimate passes
    the limit or after 1/16 of the limit was written; two writers still keep the limit."""
    from dataloader import cache

    listings = []
    real_listdir = os.listdir
    monkeypatch.setattr(cache.os, "listdir", lambda path: listings.append(path) or real_listdir(path))
    a, b = DiskLRU(str(tmp_path), max_bytes=160_000), DiskLRU(str(tmp_path), max_bytes=160_000)
    listings.clear()
    for i in range(100):
        (a if i % 2 else b).put(f"obj-{i}", bytes(1000))
    assert len(listings) <= 2 + 2 * 100_000 // 10_000, f"{len(listings)} listings for 100 puts"
    for i in range(200):
        (a if i % 2 else b).put(f"more-{i}", bytes(1000))
    size = sum(os.path.getsize(os.path.join(tmp_path, "objects", f))
               for f in real_listdir(os.path.join(tmp_path, "objects")))
    assert size <= 160_000 + 2 * 160_000 // 16, "each writer overshoots by at most 1/16 of the limit"


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

    def take_lock():
        with DiskLRU(str(tmp_path), 1 << 20).fetch_lock("shard-0"):
            pass

    taker = threading.Thread(target=take_lock, daemon=True)
    taker.start()
    taker.join(60)  # a hang detector, not a speed limit: a stale lock blocks forever
    assert not taker.is_alive(), "a crashed holder left a stale lock"


class FakeClock:
    """Stands in for the `time` module of dataloader.request_budget: exact, no noise."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:  # a real sleep always moves the clock on
        self.now = max(self.now + seconds, math.nextafter(self.now, math.inf))


def test_token_bucket_spaces_requests_by_one_over_the_rate(tmp_path, monkeypatch):
    """Back-to-back requests are granted 1/rate apart; after an idle spell the bucket holds
    one token (burst of one), not rate * idle time. Real-time pacing is measured by
    benchmarks/request_budget.py."""
    from dataloader import request_budget

    clock = FakeClock()
    monkeypatch.setattr(request_budget, "time", clock)
    budget = RequestBudget(str(tmp_path), 10.0, 2)
    granted_at = []
    for _ in range(5):
        with budget.request():
            granted_at.append(clock.now)
    clock.now += 5.0
    for _ in range(2):
        with budget.request():
            granted_at.append(clock.now)
    assert granted_at == pytest.approx([1000.0, 1000.1, 1000.2, 1000.3, 1000.4, 1005.4, 1005.5])
    assert budget.granted() == 7


def _spend(folder, rate, n):
    budget = RequestBudget(folder, rate, 2)
    for _ in range(n):
        with budget.request():
            pass


def test_budget_is_shared_by_the_processes_of_a_node(tmp_path):
    """Three processes draw from one bucket: the node's count of granted tokens is their sum."""
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_spend, args=(str(tmp_path), 200.0, 12)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert RequestBudget(str(tmp_path), 200.0, 2).granted() == 36


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


@pytest.mark.parametrize("arena_bytes", [64 << 20, 40 << 10])
def test_worker_results_through_shared_memory_or_pickled_when_it_is_full(demo_dir, monkeypatch, arena_bytes):
    """Result arrays travel through each worker's shared-memory ring; one that does not fit in
    its free part is pickled instead (40 KiB: images often do not fit, token rows do)."""
    from dataloader import worker_pool
    from dataloader.loader import build_loader
    from tests.dataloader.helpers import assert_same_rows, take_rows, tiny_config

    monkeypatch.setattr(worker_pool, "ARENA_BYTES", arena_bytes)
    direct = build_loader(tiny_config(demo_dir), seed=5, dp_rank=0, dp_size=1, rows_per_step=2)
    pooled = build_loader(tiny_config(demo_dir, workers=2, prefetch=3), seed=5, dp_rank=0, dp_size=1,
                          rows_per_step=2)
    taken = []
    real_take = pooled._pool._take
    pooled._pool._take = lambda worker, array: taken.append(type(array).__name__) or real_take(worker, array)
    assert_same_rows(take_rows(pooled, 6), take_rows(direct, 6))
    assert "_InArena" in taken
    assert ("ndarray" in taken) == (arena_bytes < 1 << 20), "the fallback runs exactly when the ring is full"
    pooled.close()
