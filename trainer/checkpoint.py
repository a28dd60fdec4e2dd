"""Checkpoints: complete or absent, layout-free, sharded, verified where they are read.

    <run_dir>/checkpoints/
        step_00000020/              a complete checkpoint (renamed into place last)
            .metadata, __*_*.distcp torch.distributed.checkpoint files (every rank writes its part)
            meta.json               step, model config, parallel layout, data state per replica
            MANIFEST.json           every file's size and crc32, written last, before the rename
        .tmp-step_00000030/         a save in progress or one that crashed: never loaded

What is saved, by global name so any layout can load it: every parameter of
every chunk, expert and the vision encoder (`model.<name>`, in the compute dtype),
the routers' balancing biases, the optimizer state of every parameter
(`optim.<name>.<state>`, e.g. exp_avg, exp_avg_sq; with bf16 also `master`, the
fp32 weights), each rank's torch RNG state and, in meta.json, the optimizer step
(the LR schedule is a function of it) and the data state.

Sharded: optimizer state is a 1-D entry per parameter that each rank writes only
the flat ranges of its ZeRO-1 shard of (parallel/flat_chunks.py); no rank gathers
a whole moment. Loading asks DCP for the ranges the new layout needs, so a
checkpoint saved with one dp / pp / vpp / ep loads into another (and into one process).

    save:  every rank  DCP writes its files -> crc32 of ITS OWN files -> its manifest part
           rank 0      every rank's part present and every file .metadata names covered
                       -> MANIFEST.json (the merged parts) -> rename .tmp-step_N -> step_N
    load:  rank 0      picks the newest checkpoint whose MANIFEST lists files of the right
                       sizes (cheap: no checksums) and tells every rank
           every rank  checks .metadata and meta.json, then only the data files its read
                       plan touches, each once, before reading them

A damaged file makes the load fail on every rank (DCP shares the failure); with
`--resume auto` the job then falls back to the next older checkpoint. A checkpoint
of another model config is refused with the differing fields named. DCP's
`.metadata` is a pickle: it is read through an allow-list of metadata types
(checkpoint_metadata.py), so a tampered one is refused instead of run. Only
directories named exactly `step_<digits>` are ours; anything else in checkpoints/
(a `step_00000002.bak` copy) is left alone.

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
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import MetadataIndex

from model.config import ConfigError
from trainer.checkpoint_metadata import SafeReader

MANIFEST = "MANIFEST.json"
MANIFEST_PARTS = "manifest"  # <rank>.json from every writer, merged into MANIFEST.json
META = "meta.json"
DCP_METADATA = ".metadata"
PREFIX = "step_"
_NAME = re.compile(rf"{PREFIX}(\d+)")


class CheckpointWriteError(RuntimeError):
    """A save that failed; its temporary directory is gone, earlier checkpoints are intact."""


class CorruptCheckpoint(ConfigError):
    """A checkpoint file does not match its manifest (size or checksum)."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _from_rank0(value):
    """Rank 0's `value` on every rank (a decision only rank 0 made)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "crc32": _crc32(path)}


def _manifest(directory: Path) -> dict:
    """MANIFEST.json of a directory one process wrote whole (e.g. launch.convert import)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"world": 1, "files": {str(p.relative_to(directory)): _file_entry(p) for p in files}}


def _check_file(directory: Path, name: str, info: dict | None, checksum: bool) -> str | None:
    """None if `name` matches its manifest entry, else what is wrong with it."""
    path = directory / name
    if info is None:
        return f"{name} is not in the manifest"
    if not path.is_file():
        return f"{name} is missing"
    if path.stat().st_size != info["bytes"]:
        return f"{name} has {path.stat().st_size} bytes, the manifest says {info['bytes']}"
    if checksum and _crc32(path) != info["crc32"]:
        return f"{name} does not match its checksum"
    return None


def _read_manifest(directory: Path) -> tuple[dict | None, str | None]:
    """(file entries, None) or (None, what is wrong).

    Known limit: every rank of a resume reads the merged manifest, one entry per file
    (about one file per rank): some 100 KB at thousands of ranks, read once per resume.
    """
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None, "no MANIFEST.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return None, "MANIFEST.json is not valid JSON"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, "MANIFEST.json has no file list (written by an older version?)"
    return manifest["files"], None


def verify(directory: Path, checksums: bool = True) -> str | None:
    """None if the checkpoint is complete (and, with `checksums`, intact), else what is
    wrong with it. Checksums read every byte: `load` checks only what a rank reads."""
    files, problem = _read_manifest(directory)
    if problem is not None:
        return problem
    for name, info in files.items():
        problem = _check_file(directory, name, info, checksums)
        if problem is not None:
            return problem
    return None


def checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint directories, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def newest_complete(root: Path, skip: set[Path] = frozenset()) -> Path | None:
    """The newest checkpoint whose manifest lists files of the right sizes (no checksums)."""
    for path in checkpoints(root):
        if path in skip:
            continue
        problem = verify(path, checksums=False)
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


class _SavePlanner(DefaultSavePlanner):
    """DCP's planner, plus entries this rank holds only ranges of (FlatChunks)."""

    def lookup_object(self, index: MetadataIndex):
        piece = _piece(self.state_dict, index)
        return piece if piece is not None else super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        # DCP's set-up replaces, in place, every object it does not know by None; put the
        # ranged entries back, in the nested dict and in the flat one the planner reads
        ranged = _ranged_entries(state_dict)
        super().set_up_planner(state_dict, metadata, is_coordinator)
        for path, entry in ranged.items():
            node = state_dict
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = self.state_dict[".".join(path)] = entry

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        piece = _piece(self.state_dict, index)
        return piece if piece is not None else super().lookup_tensor(index)


def _is_ranged(entry) -> bool:
    return not isinstance(entry, torch.Tensor) and hasattr(entry, "__get_tensor_shard__")


def _ranged_entries(state_dict: dict, path: tuple = ()) -> dict[tuple, object]:
    found = {}
    for key, value in state_dict.items():
        if isinstance(value, dict):
            found.update(_ranged_entries(value, path + (key,)))
        elif _is_ranged(value):
            found[path + (key,)] = value
    return found


def _piece(state_dict: dict, index: MetadataIndex) -> torch.Tensor | None:
    entry = state_dict.get(index.fqn)
    return entry.__get_tensor_shard__(index) if _is_ranged(entry) else None


class _ManifestWriter(dcp.FileSystemWriter):
    """Remembers the files this rank wrote, so it can checksum them into its part."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.files: set[str] = set()

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        self.files.update(r.storage_data.relative_path for r in future.wait())
        return future


class _VerifyingReader(SafeReader):
    """Checks every data file its rank's read plan touches against the manifest, once,
    before reading it; files no read of this rank touches are never opened.

    Known cost: a file is read once more for its checksum, whole, even when the rank
    needs a few of its byte ranges (the manifest has one crc32 per file; per-chunk
    checksums would let a rank check only what it reads)."""

    def __init__(self, path: Path, files: dict):
        super().__init__(str(path))
        self.directory, self.files = path, files
        self.verified: set[str] = set()

    def verify(self, names) -> None:
        for name in sorted(set(names) - self.verified):
            problem = _check_file(self.directory, name, self.files.get(name), checksum=True)
            if problem is not None:
                raise CorruptCheckpoint(f"checkpoint {self.directory}: {problem}")
            self.verified.add(name)

    def read_data(self, plan, planner):
        self.verify(self.storage_data[item.storage_index].relative_path for item in plan.items)
        return super().read_data(plan, planner)


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


def _agree(problem: str | None) -> str | None:
    """A problem one rank found is every rank's problem (so all take the same branch).
    An object collective: it runs on gloo and NCCL alike (no tensor to place)."""
    if not dist.is_initialized():
        return problem
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problem)
    found = [(rank, p) for rank, p in enumerate(everyone) if p is not None]
    if problem is None and found:
        problem = f"rank {found[0][0]} found: {found[0][1]}"
    return problem


def _load_failure(path: Path, error: BaseException) -> ConfigError:
    """DCP reports a failure on any rank as a CheckpointException on every rank."""
    failures = ([exc for exc, _ in error.failures.values()]
                if isinstance(error, CheckpointException) else [error])
    corrupt = next((f for f in failures if isinstance(f, CorruptCheckpoint)), None)
    if corrupt is not None:
        return CorruptCheckpoint(str(corrupt))
    return ConfigError(f"cannot load checkpoint {path} into this layout: "
                       f"{type(failures[0]).__name__}: {failures[0]}")


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

    def save(self, step: int, model: dict[str, torch.Tensor], optimizer: dict[str, dict],
             meta: dict) -> Path:
        """Collective: every rank passes the tensors it holds (replicas may repeat names)
        and the pieces of the optimizer state it holds (`FlatChunks`)."""
        rank = _rank()
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{final.name}"
        parts = tmp / MANIFEST_PARTS
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # a crashed earlier attempt
            parts.mkdir(parents=True)
        _barrier()
        state = {"model": model, "optim": optimizer,
                 "rng": {f"rank{rank}": torch.get_rng_state()}}
        if torch.cuda.is_initialized():  # this rank's GPU generator (dropout-free today)
            state["rng"][f"cuda{rank}"] = torch.cuda.get_rng_state()
        writer = _ManifestWriter(tmp)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # single process: DCP warns that it is one
                metadata = dcp.save(state, storage_writer=writer, planner=_SavePlanner())
        except (Exception, CheckpointException) as e:  # every rank gets DCP's verdict
            self._failed(tmp, step, _first_failure(e), state, every_rank=True)
        error: OSError | None = None
        try:
            mine = {name: _file_entry(tmp / name) for name in sorted(writer.files)}
            if rank == 0:
                (tmp / META).write_text(json.dumps(dict(meta, step=step, saved_at=time.time()),
                                                   indent=1))
                mine.update({name: _file_entry(tmp / name) for name in (DCP_METADATA, META)})
            (parts / f"{rank}.json").write_text(json.dumps(mine))
        except OSError as e:  # e.g. the disk filled up after DCP's files
            error = e
        _barrier()
        problem = None
        if rank == 0 and error is None:
            try:
                problem = self._finish(tmp, final, parts, metadata)
            except OSError as e:
                error = e
        if _agree(str(error) if error else None) is not None:
            self._failed(tmp, step, error or RuntimeError("another rank's write failed"),
                         state, every_rank=True)
        problem = _from_rank0(problem)
        if problem is not None:
            raise RuntimeError(f"checkpoint {final} was not completed: {problem}")
        return final

    def _finish(self, tmp: Path, final: Path, parts: Path, metadata) -> str | None:
        """Rank 0: merge the parts, check they cover every file, publish by renaming."""
        files: dict[str, dict] = {}
        for rank in range(_world()):
            part = parts / f"{rank}.json"
            if not part.is_file():
                return f"rank {rank} wrote no manifest part"
            files.update(json.loads(part.read_text()))
        named = {info.relative_path for info in metadata.storage_data.values()}
        missing = sorted((named | {DCP_METADATA, META}) - files.keys())
        if missing:
            return f"{missing[:3]} are in no rank's manifest part"
        shutil.rmtree(parts)
        with (tmp / MANIFEST).open("w") as f:
            json.dump({"world": _world(), "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in checkpoints(self.root)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        return None

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

    def resolve(self, resume: str, skip: set[Path] = frozenset()) -> Path | None:
        """The checkpoint `--resume` names: None (fresh start), the newest complete one not
        in `skip`, or a path. Collective: rank 0 looks at the files, every rank gets the
        answer (checksums are checked later, by each rank, for what it reads)."""
        if resume == "none":
            return None
        if resume == "auto":
            return _from_rank0(newest_complete(self.root, skip) if _rank() == 0 else None)
        path = Path(resume)
        problem = None
        if _rank() == 0:
            problem = verify(path, checksums=False) if path.is_dir() else "no such directory"
        problem = _from_rank0(problem)
        if problem is not None:
            raise ConfigError(f"--resume {resume}: cannot use this checkpoint: {problem}")
        return path

    @staticmethod
    def _reader(path: Path) -> _VerifyingReader:
        """A DCP reader of `path` whose .metadata has been checked (on every rank)."""
        files, problem = _read_manifest(path)
        reader = None
        if problem is None:
            reader = _VerifyingReader(path, files)
            try:
                reader.verify([DCP_METADATA])
            except CorruptCheckpoint as e:
                problem = str(e)
        problem = _agree(problem)
        if problem is not None:
            raise CorruptCheckpoint(f"checkpoint {path}: {problem}")
        # the allow-listed unpickling, before any DCP collective; every rank reads the same
        # file, so a refusal (UnsafeCheckpoint, not skipped by --resume auto) is everyone's
        reader.check()
        return reader

    @classmethod
    def read_meta(cls, path: Path, model_config: dict) -> dict:
        """meta.json (checked against the manifest); refuses another model config."""
        files, problem = _read_manifest(path)
        problem = problem or _check_file(path, META, files.get(META), checksum=True)
        problem = _agree(problem)
        if problem is not None:
            raise CorruptCheckpoint(f"checkpoint {path}: {problem}")
        meta = json.loads((path / META).read_text())
        diffs = _config_differences(meta["model"], model_config)
        if diffs:
            raise ConfigError(f"checkpoint {path} was saved for another model config ("
                              + "; ".join(diffs[:6]) + "): resume with the same model.* settings "
                              "or start a new job.run_dir / --resume none")
        return meta

    @classmethod
    def saved_keys(cls, path: Path) -> set[str]:
        """Names of the tensors in the checkpoint (`model.<param>`, `optim.<param>.<state>`)."""
        return set(cls._reader(path).read_metadata().state_dict_metadata)

    @classmethod
    def load(cls, path: Path, model: dict[str, torch.Tensor], optimizer: dict[str, dict],
             same_world: bool) -> list[str]:
        """Collective: fills `model` (in place) and `optimizer` (tensors or `FlatChunks`
        views into the optimizer's shards) from `path`; returns the files this rank checked
        (those it read). Raises `CorruptCheckpoint` on every rank if a file any rank reads
        does not match the manifest.

        RNG states are per rank, so they are restored only when the world size is unchanged.
        """
        reader = cls._reader(path)
        state: dict = {"model": model, "optim": optimizer}
        rng = torch.empty_like(torch.get_rng_state())
        cuda_rng = None
        if same_world:
            state["rng"] = {f"rank{_rank()}": rng}
            if (torch.cuda.is_initialized()
                    and f"rng.cuda{_rank()}" in reader.read_metadata().state_dict_metadata):
                cuda_rng = state["rng"][f"cuda{_rank()}"] = torch.empty_like(
                    torch.cuda.get_rng_state())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(state, storage_reader=reader, planner=_LoadPlanner())
        except (Exception, CheckpointException) as e:  # e.g. a name the checkpoint lacks
            raise _load_failure(path, e) from e
        if same_world:
            torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng)
        return sorted(reader.verified)
