"""Checkpoints: complete or absent, layout-free, verified before use.

    <run_dir>/checkpoints/
        step_00000020/              a complete checkpoint (renamed into place last)
            .metadata, __*_*.distcp torch.distributed.checkpoint files (every rank writes its part)
            meta.json               step, model config, parallel layout, data state per replica
            MANIFEST.json           every file's size and crc32, written last, before the rename
        .tmp-step_00000030/         a save in progress or one that crashed: never loaded

What is saved, by global name so any layout can load it: every parameter of
every chunk, expert and the vision encoder, the routers' balancing biases, the
AdamW moments of every parameter gathered from the ZeRO-1 shards, the optimizer
step (the LR schedule is a function of it), each rank's torch RNG state and the
data state. A checkpoint saved with one dp / pp / vpp / ep loads into another
(names are global; each rank takes what it holds and re-shards the moments).

Loading picks the newest checkpoint whose MANIFEST matches the files on disk; a
truncated or corrupt one is skipped with a warning. A checkpoint of another
model config is refused with the differing fields named. DCP's `.metadata` is a
pickle: it is read through an allow-list of metadata types (checkpoint_metadata.py),
so a tampered one is refused instead of run. Only directories named exactly
`step_<digits>` are ours; anything else in checkpoints/ (a `step_00000002.bak`
copy) is left alone.

A save that fails (e.g. the disk is full) removes its temporary directory and says
why; the previous checkpoint was never touched, so `--resume auto` continues from it.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from model.config import ConfigError
from trainer.checkpoint_metadata import SafeReader

MANIFEST = "MANIFEST.json"
META = "meta.json"
PREFIX = "step_"
_NAME = re.compile(rf"{PREFIX}(\d+)")


class CheckpointWriteError(RuntimeError):
    """A save that failed; its temporary directory is gone, earlier checkpoints are intact."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _tensors(state):
    """Every tensor in a nested dict of tensors."""
    for value in state.values():
        if isinstance(value, dict):
            yield from _tensors(value)
        elif isinstance(value, torch.Tensor):
            yield value


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _manifest(directory: Path) -> dict:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "crc32": _crc32(p)}
            for p in files}


def verify(directory: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no MANIFEST.json (the save did not finish)"
    try:
        expected = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "MANIFEST.json is not valid JSON"
    for name, info in expected.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != info["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {info['bytes']}"
        if _crc32(path) != info["crc32"]:
            return f"{name} does not match its checksum"
    return None


def checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint directories, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def newest_valid(root: Path) -> Path | None:
    for path in checkpoints(root):
        problem = verify(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None


def _config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return diffs


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, in one process (for inspection and tests)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = SafeReader(path)
    metadata = reader.read_metadata()
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming a single process": intended here
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def _first_failure(e: BaseException) -> BaseException:
    """The exception behind DCP's CheckpointException (it wraps each rank's as a pair)."""
    failures = getattr(e, "failures", None)
    if failures:
        return next(iter(failures.values()))[0]
    return e


def _no_space(e: BaseException, root: Path, needed: int) -> bool:
    """Whether a failed save ran out of disk. torch.save into a full disk reports
    'unexpected pos N vs M' with the OSError only as its context; where even that is lost,
    a free space below what this rank was writing counts as well."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(root).free < needed
    except OSError:
        return False


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def save(self, step: int, model: dict[str, torch.Tensor],
             optimizer: dict[str, dict[str, torch.Tensor]], meta: dict) -> Path:
        """Collective: every rank passes the tensors it holds (replicas may repeat names)."""
        rank = _rank()
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{final.name}"
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # a crashed earlier attempt
            tmp.mkdir(parents=True)
        _barrier()
        state = {"model": model, "optim": optimizer,
                 "rng": {f"rank{rank}": torch.get_rng_state()}}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # single process: DCP warns that it is one
                dcp.save(state, checkpoint_id=str(tmp))
        except (Exception, CheckpointException) as e:  # every rank gets DCP's verdict
            self._failed(tmp, step, _first_failure(e), state, every_rank=True)
        _barrier()
        if rank == 0:
            try:
                (tmp / META).write_text(json.dumps(dict(meta, step=step, saved_at=time.time()),
                                                   indent=1))
                manifest = _manifest(tmp)
                with (tmp / MANIFEST).open("w") as f:
                    json.dump(manifest, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                self._failed(tmp, step, e, {}, every_rank=False)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in checkpoints(self.root)[self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def _failed(self, tmp: Path, step: int, cause: BaseException, state: dict,
                every_rank: bool) -> None:
        """Remove the partial save (rank 0) and raise one line that says what happened.
        `every_rank`: all ranks are here (DCP's verdict is collective), so they judge the
        free space before rank 0 frees it."""
        needed = sum(t.numel() * t.element_size() for t in _tensors(state))
        no_space = _no_space(cause, self.root, needed)
        free = shutil.disk_usage(self.root).free if no_space else 0
        if every_rank:
            _barrier()
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = next(iter(checkpoints(self.root)), None)
        kept = (f"the previous checkpoint {previous.name} is intact and --resume auto continues "
                "from it" if previous else "there is no earlier checkpoint")
        if no_space:
            raise CheckpointWriteError(
                f"no space left on {self.root} ({free >> 20} MiB free; this rank's part of the "
                f"step-{step} checkpoint is {needed >> 20} MiB): the checkpoint was not written "
                f"and its temporary directory was removed; {kept}. Free space or lower "
                "checkpoint.keep") from cause
        raise CheckpointWriteError(
            f"saving the step-{step} checkpoint to {tmp} failed ({type(cause).__name__}: "
            f"{cause}); its temporary directory was removed; {kept}") from cause

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint `--resume` names: None (fresh start), newest valid, or a path."""
        if resume == "none":
            return None
        if resume == "auto":
            return newest_valid(self.root)
        path = Path(resume)
        problem = verify(path) if path.is_dir() else "no such directory"
        if problem is not None:
            raise ConfigError(f"--resume {resume}: cannot use this checkpoint: {problem}")
        return path

    @staticmethod
    def read_meta(path: Path, model_config: dict) -> dict:
        meta = json.loads((path / META).read_text())
        diffs = _config_differences(meta["model"], model_config)
        if diffs:
            raise ConfigError(f"checkpoint {path} was saved for another model config ("
                              + "; ".join(diffs[:6]) + "): resume with the same model.* settings "
                              "or start a new job.run_dir / --resume none")
        return meta

    @staticmethod
    def load(path: Path, model: dict[str, torch.Tensor],
             optimizer: dict[str, dict[str, torch.Tensor]], same_world: bool) -> None:
        """Collective: fills `model` (in place) and `optimizer` (pre-allocated) from `path`.

        RNG states are per rank, so they are restored only when the world size is unchanged.
        """
        state: dict = {"model": model, "optim": optimizer}
        rng = torch.empty_like(torch.get_rng_state())
        if same_world:
            state["rng"] = {f"rank{_rank()}": rng}
        reader = SafeReader(path)
        reader.check()  # before any collective: a refusal is the same on every rank
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(state, storage_reader=reader)
        # DCP wraps every rank's failure in CheckpointException, a BaseException
        except (Exception, CheckpointException) as e:  # e.g. a name the checkpoint lacks
            cause = _first_failure(e)
            raise ConfigError(f"cannot load checkpoint {path} into this layout: "
                              f"{type(cause).__name__}: {cause}") from e
        if same_world:
            torch.set_rng_state(rng)
