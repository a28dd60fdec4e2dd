"""Object stores: where shard bytes come from.

`open_store(uri)` picks the backend from the URI: a plain path or file:// is a local
directory (the embedded default), s3://bucket/prefix is any S3-compatible store
(dataloader/s3_store.py). Stores answer whole-object GETs (sequential shard reads) and
range GETs (one sample by its index span); they raise `MissingObject` for a key that is
not there (never retried) and `StoreError` for anything that survived the retries.
"""
from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod



def atomic_write(path: str, data: bytes) -> None:
    """Write to a temporary file, then rename: readers see the old bytes or the new, never half."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def private_dir(path: str) -> str:
    """Create `path` (and parents) readable by this user only (0700), or tighten an existing
    one of ours; refuse one owned by someone else (a shared /tmp: another local user could
    read or plant cached bytes)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
        raise StoreError(f"cache folder {path} is a link or belongs to another user (uid "
                         f"{st.st_uid}): set data.disk_cache_dir to a folder of your own")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def read_file_range(path: str, byte_range: tuple[int, int] | None) -> bytes:
    """The whole file, or bytes [start, end) of it."""
    with open(path, "rb") as f:
        if byte_range is None:
            return f.read()
        f.seek(byte_range[0])
        return f.read(byte_range[1] - byte_range[0])

class StoreError(IOError):
    """A request failed for good (after the retries); the message names the object key."""


class MissingObject(StoreError):
    pass


class ObjectStore(ABC):
    """Keys are '/'-separated paths relative to the dataset root."""

    def __init__(self) -> None:
        self.requests = 0  # requests sent to the backend (retries included)
        self.bytes_read = 0

    @abstractmethod
    def get(self, key: str, byte_range: tuple[int, int] | None = None) -> bytes:
        """The object's bytes, or bytes [start, end) of it."""

    @abstractmethod
    def describe(self) -> str:
        """Where the data lives, for logs and errors; never includes credentials."""

    def get_fresh(self, key: str, etag: str | None) -> tuple[bytes | None, str | None]:
        """(None, etag) if the object is unchanged since `etag`, else (its bytes, its new ETag).
        Stores without versions (a local directory) always read it again."""
        return self.get(key), None


class LocalStore(ObjectStore):
    def __init__(self, root: str):
        super().__init__()
        if not os.path.isdir(root):
            raise MissingObject(f"dataset directory {root!r} does not exist; build the demo with "
                                f"`python -m launch.make_dataset --out {root}`")
        self.root = os.path.abspath(root)

    def _path(self, key: str) -> str:
        path = os.path.normpath(os.path.join(self.root, key))
        if not path.startswith(self.root + os.sep):
            raise StoreError(f"object key {key!r} escapes the dataset root {self.root}")
        return path

    def get(self, key: str, byte_range: tuple[int, int] | None = None) -> bytes:
        path = self._path(key)
        self.requests += 1
        try:
            data = read_file_range(path, byte_range)
        except FileNotFoundError as e:
            raise MissingObject(f"object {key!r} is missing from {self.describe()}") from e
        except OSError as e:
            raise StoreError(f"cannot read object {key!r} from {self.describe()}: {e}") from e
        if byte_range is not None and len(data) != byte_range[1] - byte_range[0]:
            raise StoreError(f"object {key!r} is shorter than its index says (wanted bytes "
                             f"{byte_range[0]}..{byte_range[1]}, got {len(data)})")
        self.bytes_read += len(data)
        return data

    def describe(self) -> str:
        return f"local directory {self.root}"


def open_store(uri: str, *, endpoint_url: str = "", region: str = "", budget=None,
               max_retries: int = 8, retry_base_s: float = 0.05, retry_max_s: float = 2.0,
               timeout_s: float = 20.0, retry_deadline_s: float = 60.0) -> ObjectStore:
    if uri.startswith("s3://"):
        from dataloader.s3_store import S3Store

        return S3Store(uri, endpoint_url=endpoint_url, region=region, budget=budget,
                       max_retries=max_retries, retry_base_s=retry_base_s,
                       retry_max_s=retry_max_s, timeout_s=timeout_s,
                       retry_deadline_s=retry_deadline_s)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise StoreError(f"data.uri {uri!r}: only local paths, file:// and s3:// are supported")
    return LocalStore(uri)
