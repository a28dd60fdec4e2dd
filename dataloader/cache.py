"""The two cache tiers in front of the object store.

    read ──► MemoryLRU (per process) ──► DiskLRU (per node, size-limited) ──► ObjectStore
                                          one fetch per object per node: a flock per key
                                          makes the other processes wait and then hit disk

DiskLRU writes atomically (temp file + rename), so a crash leaves either the whole
object or nothing; temp files of dead processes are removed at start-up. Recency is the
file's mtime, refreshed on every hit. A process lists the folder to evict only when its
running estimate of the folder's size passes the limit, or after it wrote 1/16 of the
limit since its last listing (other processes write too): not on every put. Locks are flocks, dropped by the kernel when
their process dies, so no crash leaves a stale lock behind.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
from collections import OrderedDict
from contextlib import contextmanager

from dataloader.store import atomic_write, private_dir, read_file_range


class MemoryLRU:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[object, bytes] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def get(self, key):
        data = self._items.get(key)
        if data is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return data

    def put(self, key, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
        self._items[key] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted)


_TMP = re.compile(r"\.tmp\.(\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DiskLRU:
    def __init__(self, folder: str, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self._data = os.path.join(folder, "objects")
        self._locks = os.path.join(folder, "locks")
        private_dir(self._data)  # 0700: the cached bytes are this user's only
        private_dir(self._locks)
        for name in os.listdir(self._data):  # leftovers of crashed writers
            m = _TMP.search(name)
            if m and not _pid_alive(int(m.group(1))):
                try:
                    os.unlink(os.path.join(self._data, name))
                except FileNotFoundError:
                    pass
        self.hits = self.misses = 0
        self._estimate: int | None = None  # bytes in the folder at the last listing + own puts since
        self._put_since_listing = 0

    @staticmethod
    def _name(key: str) -> str:
        return hashlib.sha1(key.encode()).hexdigest()[:20] + "-" + re.sub(r"[^A-Za-z0-9_.-]", "_", key)[-80:]

    def path(self, key: str) -> str:
        return os.path.join(self._data, self._name(key))

    def get(self, key: str, byte_range: tuple[int, int] | None = None) -> bytes | None:
        path = self.path(key)
        try:
            data = read_file_range(path, byte_range)
        except FileNotFoundError:
            self.misses += 1
            return None
        try:
            os.utime(path)
        except FileNotFoundError:
            pass
        self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        atomic_write(self.path(key), data)
        self._put_since_listing += len(data)
        if (self._estimate is None or self._estimate + self._put_since_listing > self.max_bytes
                or self._put_since_listing > self.max_bytes // 16):
            self._estimate, self._put_since_listing = self._evict(), 0

    def _evict(self) -> int:
        """List the folder, drop the least recent objects over the limit; returns the bytes kept."""
        entries = []
        total = 0
        for name in os.listdir(self._data):
            if _TMP.search(name):
                continue
            try:
                st = os.stat(os.path.join(self._data, name))
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, name, st.st_size))
            total += st.st_size
        entries.sort()
        for _, name, size in entries:
            if total <= self.max_bytes:
                break
            try:
                os.unlink(os.path.join(self._data, name))
                total -= size
            except FileNotFoundError:
                pass
        return total

    @contextmanager
    def fetch_lock(self, key: str):
        """Exclusive per key across the node's processes, for one store fetch at a time."""
        fd = os.open(os.path.join(self._locks, self._name(key) + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
