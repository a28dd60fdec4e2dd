"""Reads manifest, indexes and sample bytes through the cache tiers.

Two read modes (data.read_mode):

    shard  whole-shard GETs: the first sample of a shard brings the whole tar to the
           node's disk cache (one request per shard per node), the rest are slices of it.
           Reads stay sequential because the order shuffles shards and then samples only
           inside a bounded window.
    range  one range GET per sample (the byte span of its members from the index), for
           random access to huge shards; cached in memory only.

The node's disk cache keys every object by the dataset's version (the sha256 of its
manifest, Dataset.version): the manifest itself is revalidated against the store at
every start (`fresh`: a conditional GET on the cached copy's ETag; one small request that
also proves the credentials), so a changed dataset.json starts a new set of cached
objects and stale ones age out of the LRU. Known limit: a shard rewritten in place under
an unchanged dataset.json is not noticed while cached (unless its length changed, which
`span` checks against the index); publish changed data with a new manifest.

`part` reads a few members of a shard this node does not otherwise read (DEP: the
media items the plan gives this rank from other replicas' rows): a slice of the shard
when a tier already holds it whole, else one range GET, never the whole shard.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor

from dataloader.cache import DiskLRU, MemoryLRU
from dataloader.config import LoaderConfig
from dataloader.request_budget import RequestBudget
from dataloader.store import LocalStore, ObjectStore, StoreError, open_store, private_dir


class TieredReader:
    def __init__(self, store: ObjectStore, *, memory_bytes: int, disk: DiskLRU | None, read_mode: str,
                 prefetch_threads: int = 4, version: str = ""):
        self.store, self.disk, self.read_mode = store, disk, read_mode
        self.version = version  # set by Dataset once the manifest is read
        self.memory = MemoryLRU(memory_bytes)
        self.prefetch_threads = prefetch_threads
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[str, Future] = {}

    def prefetch(self, keys) -> None:
        """Start bringing whole objects into the node's disk cache in the background (the
        read-ahead: shards the plan will read next). Only for remote stores with a disk tier;
        the requests go through the same budget as every other."""
        if self.disk is None or self.read_mode != "shard":
            return
        # finished read-aheads leave the table (with workers, `whole` never runs here to pop
        # them, and a stale entry would block prefetching the shard again after eviction);
        # failed ones stay so that `whole` re-raises them where the bad-data policy applies
        self._inflight = {k: f for k, f in self._inflight.items()
                          if not f.done() or f.exception() is not None}
        for key in keys:
            if (key in self._inflight or self.memory.get(key) is not None
                    or os.path.exists(self.disk.path(self._disk_key(key)))):
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.prefetch_threads, thread_name_prefix="k25-prefetch")
            self._inflight[key] = self._pool.submit(self._to_disk, key)

    def _disk_key(self, key: str) -> str:
        return f"{self.version}/{key}"

    def _to_disk(self, key: str) -> None:
        dkey = self._disk_key(key)
        with self.disk.fetch_lock(dkey):
            if not os.path.exists(self.disk.path(dkey)):
                self.disk.put(dkey, self.store.get(key))

    def fresh(self, key: str) -> bytes:
        """The object as the store has it now (the manifest, at start). With a disk cache: a
        conditional GET against the cached copy's ETag, so an unchanged object costs one
        empty 304 answer; a wrong secret or a changed object is seen either way."""
        if self.disk is None:
            return self.store.get(key)
        dkey = f"etag/{key}"  # stored as b"<etag>\n<bytes>": one file, written atomically
        with self.disk.fetch_lock(dkey):
            cached = self.disk.get(dkey)
            etag, _, body = cached.partition(b"\n") if cached else (b"", b"", b"")
            data, new_etag = self.store.get_fresh(key, etag.decode() or None)
            if data is None:
                return body
            if new_etag:
                self.disk.put(dkey, new_etag.encode() + b"\n" + data)
            return data

    def whole(self, key: str) -> bytes:
        data = self.memory.get(key)
        if data is not None:
            return data
        pending = self._inflight.pop(key, None)
        if pending is not None:
            pending.result()  # re-raises a failed prefetch here, where the policy applies
        if self.disk is not None:
            dkey = self._disk_key(key)
            data = self.disk.get(dkey)
            if data is None:
                with self.disk.fetch_lock(dkey):
                    data = self.disk.get(dkey)  # another process may have fetched it meanwhile
                    if data is None:
                        data = self.store.get(key)
                        self.disk.put(dkey, data)
        else:
            data = self.store.get(key)
        self.memory.put(key, data)
        return data

    def span(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object (one sample's members)."""
        if self.read_mode == "shard":
            data = self.whole(key)
            if len(data) < end:  # a truncated shard: say so, not "undecodable image"
                raise StoreError(f"object {key!r} on {self.store.describe()} is shorter than "
                                 f"its index says ({len(data)} bytes, a sample ends at {end})")
            return data[start:end]
        return self._range(key, start, end)

    def part(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object, without fetching all of it."""
        data = self.memory.get(key)
        if data is not None:
            return data[start:end]
        if self.disk is not None:
            data = self.disk.get(self._disk_key(key), (start, end))
            if data is not None:
                return data
        return self._range(key, start, end)

    def _range(self, key: str, start: int, end: int) -> bytes:
        mkey = (key, start, end)
        data = self.memory.get(mkey)
        if data is None:
            data = self.store.get(key, (start, end))
            self.memory.put(mkey, data)
        return data

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._inflight.clear()


def cache_folder(cfg: LoaderConfig) -> str:
    """The node's cache of this dataset: data.disk_cache_dir, or a folder of this user's under
    the temp dir (0700: a private bucket's bytes must not be readable by other local users)."""
    if cfg.disk_cache_dir:
        return cfg.disk_cache_dir
    tag = hashlib.sha1(f"{cfg.uri}|{cfg.s3_endpoint_url}".encode()).hexdigest()[:12]
    base = private_dir(os.path.join(tempfile.gettempdir(), f"k25-loader-cache-{os.getuid()}"))
    return os.path.join(base, tag)


def make_reader(cfg: LoaderConfig, version: str = "") -> TieredReader:
    """Store + tiers for this process. Remote stores get the node's disk cache and budget.
    `version` is the dataset version its disk cache keys objects by (Dataset.version)."""
    remote = cfg.uri.startswith("s3://")
    cache_dir = cache_folder(cfg)
    budget = (RequestBudget(os.path.join(cache_dir, "budget"), cfg.requests_per_s,
                            cfg.max_concurrent_requests) if remote else None)
    store = open_store(cfg.uri, endpoint_url=cfg.s3_endpoint_url, region=cfg.s3_region, budget=budget,
                       max_retries=cfg.max_retries, retry_base_s=cfg.retry_base_s,
                       retry_max_s=cfg.retry_max_s, timeout_s=cfg.request_timeout_s,
                       retry_deadline_s=cfg.retry_deadline_s)
    disk = None if isinstance(store, LocalStore) else DiskLRU(cache_dir, cfg.disk_cache_mb << 20)
    return TieredReader(store, memory_bytes=cfg.memory_cache_mb << 20, disk=disk,
                        read_mode=cfg.read_mode, version=version)
