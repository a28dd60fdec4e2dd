"""Where the trainer's batches come from: the streaming loader, or the synthetic generator.

Both hand every rank the rows of ITS data-parallel replica for the next step (all
pipeline stages of a replica get the same rows) and have a state that a checkpoint
stores, so a resumed run continues the identical data sequence. What else a rank
gets depends on its role (`DataRole`):

    single process, colocated stage 0   pixels of its own rows' media ("own")
    colocated stages 1..pp-1            no pixels at all ("none")
    DEP, every rank                     the media metadata of its DEP group's rows (derived
                                        locally) and the pixels of exactly the items the
                                        DEP plan assigns to it (a selection callback)
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from dataloader.batch import Batch, GroupMedia
from dataloader.config import LoaderConfig, LoaderConfigError
from dataloader.synthetic import SyntheticBatches, SyntheticConfig
from model.config import ConfigError
from trainer.config import JobConfig


@contextmanager
def _refusals(uri: str):
    """The loader's refusals at start (a malformed manifest, a store that says no, a loader
    state of another dataset) as one-line ConfigErrors; failures later in the run stay
    exceptions with their traceback."""
    from dataloader.dataset import DatasetError
    from dataloader.loader import LoaderStateError
    from dataloader.store import StoreError

    try:
        yield
    except (DatasetError, LoaderStateError, StoreError) as e:
        raise ConfigError(f"data.uri={uri}: {e}") from e


@dataclass
class DataRole:
    """What one rank needs from the data source each step."""

    dp_rank: int = 0
    dp: int = 1
    # "own": decode the media of its own rows; "none": decode nothing; or (DEP)
    # select(step, [(replica, MediaItem)]) -> the item ids of the group this rank decodes
    decode: str | Callable = "own"
    plan_replicas: tuple[int, ...] = field(default_factory=tuple)  # DEP group (metadata only)


def loader_config(cfg: JobConfig) -> LoaderConfig:
    """The loader's own settings out of the job's data section (a superset of them)."""
    return LoaderConfig(**{name: getattr(cfg.data, name)
                           for name in LoaderConfig.__dataclass_fields__})


class SyntheticSource:
    """The built-in generator: the global batch of step s is a pure function of (seed, s).

    Every rank generates the whole global batch (pixels included) and keeps what its role
    needs: a test and demo source, not one for jobs whose size matters."""

    def __init__(self, cfg: JobConfig, role: DataRole):
        self.generator = SyntheticBatches(SyntheticConfig(
            seq_len=cfg.data.seq_len, vocab_size=cfg.model.lm.vocab_size,
            media_token_id=cfg.model.media_token_id, patch_dim=cfg.model.vision.patch_dim,
            media_per_seq=cfg.data.media_per_seq, max_side=cfg.data.max_image_patches_side,
            max_frames=cfg.model.vision.max_frames, edge_cases=cfg.data.edge_cases),
            seed=cfg.train.seed)
        self.rows = cfg.train.global_batch // role.dp
        self.global_rows = cfg.train.global_batch
        self.role = role
        self.step = 0

    def next_batch(self) -> Batch:
        whole = self.generator.global_batch(self.step, self.global_rows)
        step, self.step = self.step, self.step + 1
        role, rows = self.role, self.rows
        batch = whole.rows(role.dp_rank * rows, (role.dp_rank + 1) * rows)
        if role.decode == "none" or callable(role.decode):
            for m in batch.media:
                m.patches = None
        if callable(role.decode):
            replicas = sorted(set(role.plan_replicas) | {role.dp_rank})
            items, pixels = [], {}
            for r in replicas:
                part = whole.rows(r * rows, (r + 1) * rows)
                items += [(r, m) for m in part.media]
                pixels.update({m.item_id: m.patches for m in part.media})
            wanted = set(role.decode(step, items))
            digest = hashlib.sha256(whole.tokens[replicas[0] * rows:(replicas[-1] + 1) * rows]
                                    .numpy().tobytes()).hexdigest()
            for _, m in items:
                m.patches = None
            batch.group = GroupMedia(step, items, {i: pixels[i] for i in wanted}, digest)
        return batch

    def state_dict(self) -> dict:
        return {"synthetic_step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if "synthetic_step" not in state:
            raise ConfigError("the checkpoint was written by a run on a dataset (the streaming "
                              "loader), not on synthetic data: resume it with that run's "
                              "data.uri")
        self.step = int(state["synthetic_step"])

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        if any(s != states[0] for s in states):
            raise ConfigError(f"the ranks' synthetic data states differ: {states[:4]}")
        return states[0]

    def close(self) -> None:
        pass


class LoaderSource:
    """The deterministic streaming loader over a local directory or S3 (dataloader/)."""

    def __init__(self, cfg: JobConfig, role: DataRole):
        from dataloader.loader import build_loader

        with _refusals(cfg.data.uri):
            self.loader = build_loader(loader_config(cfg), seed=cfg.train.seed, dp_rank=role.dp_rank,
                                       dp_size=role.dp, rows_per_step=cfg.train.global_batch // role.dp,
                                       plan_replicas=role.plan_replicas, decode=role.decode)
        vocab, media_id, _ = self.loader.tokenizer_info
        if vocab > cfg.model.lm.vocab_size or media_id != cfg.model.media_token_id:
            raise ConfigError(
                f"the dataset's tokenizer has {vocab} tokens and media token id {media_id}; the "
                f"model has model.lm.vocab_size={cfg.model.lm.vocab_size} and "
                f"model.media_token_id={cfg.model.media_token_id}: make them match")

    def next_batch(self) -> Batch:
        return next(self.loader)

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "loader" not in state:
            raise ConfigError("the checkpoint was written by a run on synthetic data; "
                              "resume it with --data.uri synthetic")
        with _refusals(self.loader.cfg.uri):
            self.loader.load_state_dict(state["loader"])

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        from dataloader.loader import merge_states

        return {"loader": merge_states([s["loader"] for s in states])}

    def close(self) -> None:
        self.loader.close()


def job_data_state(data, holds_replica_state: bool) -> dict | None:
    """The data state of the whole job, on rank 0 (None elsewhere); a collective.

    Each replica's loader holds the state of its own rows only (lanes, dataloader/), so a
    checkpoint needs them all: one rank per replica (`holds_replica_state`) sends its
    state to rank 0, which merges them. Runs only when a checkpoint is written."""
    mine = data.state_dict() if holds_replica_state else None
    if not dist.is_initialized():
        return data.merge_states([mine])
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if gathered is None:
        return None
    return data.merge_states([s for s in gathered if s is not None])


def check_data_config(cfg: JobConfig) -> None:
    """Part of JobConfig validation: the dataset exists and the loader settings are valid."""
    if cfg.data.uri == "synthetic":
        return
    try:
        loader_config(cfg).validate()
    except LoaderConfigError as e:
        raise ConfigError(str(e)) from None
    uri = cfg.data.uri
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://"))
        if not (path / "dataset.json").is_file():
            raise ConfigError(f"data.uri={uri}: no dataset there (no dataset.json); build the demo "
                              f"dataset with `python -m launch.make_dataset --out {uri}` or point "
                              "data.uri at one (or use data.uri=synthetic)")


def build_data(cfg: JobConfig, role: DataRole | None = None):
    role = role or DataRole(dp=cfg.parallel.dp)
    if cfg.data.uri == "synthetic":
        return SyntheticSource(cfg, role)
    return LoaderSource(cfg, role)
