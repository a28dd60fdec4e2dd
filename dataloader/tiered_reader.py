"""Reads manifest, indexes and sample bytes through the cache tiers.

Two read modes (data.read_mode):

    shard  whole-shard GETs: the first sample of a shard brings the whole tar to the
           node's disk cache (one request per shard per node), the rest are slices of it.
           Reads stay sequential because the order shuffles shards and then samples only
           inside a bounded window.
    range  one range GET per sample (the byte span of its members from the index), for
           random access to huge shards; cached in memory only.
"""
from __future__ import annotations

from dataloader.cache import DiskLRU, MemoryLRU
from dataloader.store import ObjectStore


class TieredReader:
    def __init__(self, store: ObjectStore, *, memory_bytes: int, disk: DiskLRU | None, read_mode: str):
        self.store, self.disk, self.read_mode = store, disk, read_mode
        self.memory = MemoryLRU(memory_bytes)

    def whole(self, key: str) -> bytes:
        data = self.memory.get(key)
        if data is not None:
            return data
        if self.disk is not None:
            data = self.disk.get(key)
            if data is None:
                with self.disk.fetch_lock(key):
                    data = self.disk.get(key)  # another process may have fetched it meanwhile
                    if data is None:
                        data = self.store.get(key)
                        self.disk.put(key, data)
        else:
            data = self.store.get(key)
        self.memory.put(key, data)
        return data

    def span(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object (one sample's members)."""
        if self.read_mode == "shard":
            return self.whole(key)[start:end]
        mkey = (key, start, end)
        data = self.memory.get(mkey)
        if data is None:
            data = self.store.get(key, (start, end))
            self.memory.put(mkey, data)
        return data
