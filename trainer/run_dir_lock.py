"""One job per run directory: an exclusive flock on `<run_dir>/.lock`, held by rank 0.

Two jobs on one run_dir interleave metrics.jsonl, overwrite config.json and delete each
other's temporary checkpoints. Rank 0 takes the lock before anything is written; the
other ranks write only after joining the process group, which needs rank 0, so a refused
job writes nothing (its rank 0 exits 2, torchrun stops the others).

    job A rank 0: flock(.lock, EX|NB) ok   -> writes {"pid", "host", "started", "argv"}
    job B rank 0: flock(.lock, EX|NB) busy -> "in use by pid 4242 on node7 since ...", exit 2
    job A dies (any way, even SIGKILL)     -> the kernel drops the lock; nothing to clean up

The file stays (deleting a lock file races with a job that just opened it).

What flock guarantees where (multi-node runs keep run_dir on a shared filesystem), from
the filesystems' documentation (only a local filesystem was tried here):
- one machine: always;
- NFSv4, NFSv3 with lockd, GPFS, Lustre mounted with `-o flock`, BeeGFS with global file
  locks on: across nodes (Linux maps flock to the filesystem's byte-range locks); a lock
  of a crashed node lasts until its lease expires (about 90 s on NFSv4);
- Lustre with `-o localflock`, BeeGFS with its default node-local locks, some FUSE
  filesystems: only against a second job whose rank 0 runs on the same node. Where
  flock is refused outright (ENOLCK, EOPNOTSUPP, ENOSYS), the job warns that it cannot
  lock and runs unprotected.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from model.config import ConfigError

LOCK_FILE = ".lock"


class RunDirBusy(ConfigError):
    pass


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}: "
                f"{' '.join(info['argv'])}")
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not written its name yet"


@contextmanager
def run_dir_lock(run_dir: str | Path):
    """Hold the run directory for the duration of the block, or raise RunDirBusy."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(f"job.run_dir={run_dir} is in use by another job ({_holder(fd)}); "
                             "wait for it to end, stop it, or choose another --job.run_dir"
                             ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(f"cannot lock {path} ({e.strerror}): this filesystem has no flock, "
                          "so a second job on this run_dir would not be refused", stacklevel=3)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
