"""The loader: a deterministic, resumable iterator of `Batch` for one DP rank.

Every rank plans the same global sequence of packed rows from metadata alone, then
takes its slice of each step and materialises only that:

    global rows of step n:  [ r0 r1 | r2 r3 | r4 r5 | r6 r7 ]    rows_per_step = 2, dp_size = 4
                              rank 0  rank 1  rank 2  rank 3

The state after a step is (stream position, per-source counts, packer buffer as sample
references): small, saved in O(1) and restored in O(1). Because neither the rows nor
their contents depend on workers or on DP size, a run resumed with other values of
either continues the same global sequence of rows.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import deque

import numpy as np
import torch

from dataloader.batch import Batch, MediaItem
from dataloader.cache import DiskLRU
from dataloader.config import LoaderConfig
from dataloader.dataset import Dataset
from dataloader.materialize import Materializer, RowResult
from dataloader.packer import Packer
from dataloader.request_budget import RequestBudget
from dataloader.sample_stream import SampleStream
from dataloader.store import LocalStore, open_store, private_dir
from dataloader.template import TextTokenizer
from dataloader.tiered_reader import TieredReader
from dataloader.worker_pool import WorkerPool

log = logging.getLogger(__name__)
STATE_VERSION = 1


class LoaderStateError(ValueError):
    pass


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


def make_materializer(cfg: LoaderConfig, seed: int, tokenizer_bytes: bytes,
                      version: str = "") -> Materializer:
    return Materializer(make_reader(cfg, version), TextTokenizer(data=tokenizer_bytes), cfg, seed)


class Loader:
    def __init__(self, cfg: LoaderConfig, *, seed: int, dp_rank: int, dp_size: int, rows_per_step: int):
        cfg.validate()
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if rows_per_step <= 0:
            raise ValueError(f"rows_per_step={rows_per_step} must be positive")
        self.cfg, self.seed = cfg, seed
        self.dp_rank, self.dp_size, self.rows_per_step = dp_rank, dp_size, rows_per_step
        self.reader = make_reader(cfg)
        self.dataset = Dataset(self.reader, tokenizer_file=cfg.tokenizer, bad_data=cfg.bad_data)
        self.tokenizer = self.dataset.tokenizer
        self.stream = SampleStream(self.dataset, cfg, seed)
        self.packer = Packer(cfg.seq_len, cfg.pack_buffer, cfg.max_media_per_row, self.stream.next)
        self._materializer = Materializer(self.reader, self.tokenizer, cfg, seed)
        self._pool: WorkerPool | None = None
        self._pending: deque = deque()  # (step, task ids or plans, state after the step)
        self._planned_steps = 0
        self._started = False
        self._state = self._snapshot()
        self.skipped_keys: list[tuple[str, str]] = []  # bad samples found while materialising
        self.last_step_samples: list[list] = []  # per row of the last batch: (SampleRef, key)

    @property
    def tokenizer_info(self) -> tuple[int, int, int]:
        """(vocab_size, media_token_id, pad_id)."""
        t = self.tokenizer
        return t.vocab_size, t.media_id, t.pad_id

    @property
    def packing_efficiency(self) -> float:
        return self.packer.efficiency

    # --- state --------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        return {
            "version": STATE_VERSION,
            "dataset_checksum": self.dataset.checksum,
            "stream_checksum": self.cfg.stream_checksum(),
            "seed": self.seed,
            "steps": self._planned_steps,
            "stream": self.stream.state_dict(),
            "buffer": [[p.ref.g, p.ref.source, p.ref.k] for p in self.packer.buffer],
            "tokens_packed": self.packer.tokens_packed,
            "tokens_total": self.packer.tokens_total,
        }

    def state_dict(self) -> dict:
        """The state after the last batch returned (not after prefetched ones)."""
        return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                for k, v in self._state.items()}

    def load_state_dict(self, state: dict) -> None:
        if self._started:
            raise LoaderStateError("load_state_dict() after iteration started: build a new loader and "
                                   "restore its state before taking the first batch")
        if state.get("version") != STATE_VERSION:
            raise LoaderStateError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["dataset_checksum"] != self.dataset.checksum:
            raise LoaderStateError(
                f"loader state is from another dataset (checksum {state['dataset_checksum']}, this "
                f"dataset {self.dataset.checksum} at {self.reader.store.describe()}); point data.uri at "
                "the dataset the run started with")
        if state["stream_checksum"] != self.cfg.stream_checksum():
            raise LoaderStateError(
                "loader state was saved with other stream settings (seq_len, blend, shuffle, packing, "
                "augmentation, tokenizer or bad-data policy); restore those settings to resume. Only "
                "workers, prefetch, caches, read mode and request budget may change on resume")
        if state["seed"] != self.seed:
            raise LoaderStateError(f"loader state has seed {state['seed']}, this loader {self.seed}")
        self.stream.load_state_dict(state["stream"])
        self.packer.buffer = [self.stream.plan(self.stream.ref(g, s, k)) for g, s, k in state["buffer"]]
        self.packer.tokens_packed = int(state["tokens_packed"])
        self.packer.tokens_total = int(state["tokens_total"])
        self._planned_steps = int(state["steps"])
        self._state = self._snapshot()

    # --- iteration ----------------------------------------------------------------------
    def __iter__(self):
        return self

    def _plan_step(self) -> None:
        rows = [self.packer.next_row() for _ in range(self.dp_size * self.rows_per_step)]
        mine = rows[self.dp_rank * self.rows_per_step:(self.dp_rank + 1) * self.rows_per_step]
        step = self._planned_steps
        self._planned_steps += 1
        # read-ahead: the shards this step and the packing buffer will read, fetched in the background
        self.reader.prefetch(dict.fromkeys([p.shard_key for plans in mine for p in plans]
                                           + [p.shard_key for p in self.packer.buffer]))
        if self._pool is not None:
            for i, plans in enumerate(mine):
                self._pool.submit((step, i), plans)
        self._pending.append((step, mine, self._snapshot()))

    def __next__(self) -> Batch:
        if not self._started:
            self._started = True
            if self.cfg.workers > 0:
                self._pool = WorkerPool(self.cfg.workers, self.cfg.worker_start_method, {
                    "cfg": self.cfg, "seed": self.seed, "tokenizer_bytes": self.dataset.tokenizer_bytes,
                    "version": self.dataset.version})
        depth = 1 + (self.cfg.prefetch if self._pool is not None else 0)
        while len(self._pending) < depth:
            self._plan_step()
        step, mine, state = self._pending.popleft()
        if self._pool is not None:
            results = [self._pool.get((step, i)) for i in range(self.rows_per_step)]
        else:
            results = [self._materializer.row(plans) for plans in mine]
        self._state = state
        self.last_step_samples = [[(p.ref, p.key) for p in plans] for plans in mine]
        return self._to_batch(results)

    def _to_batch(self, results: list[RowResult]) -> Batch:
        media = []
        for row, r in enumerate(results):
            for key, reason in r.skipped:
                log.warning("bad data (skipped): %s: %s", key, reason)
                self.skipped_keys.append((key, reason))
            for item_id, grid, offset, patches in r.media:
                media.append(MediaItem(item_id, tuple(grid), row, offset, torch.from_numpy(patches)))
        stack = lambda name: torch.from_numpy(np.stack([getattr(r, name) for r in results]))
        return Batch(stack("tokens"), stack("labels"), stack("position_ids"), stack("doc_ids"), media)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self.reader.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def build_loader(cfg: LoaderConfig, *, seed: int, dp_rank: int, dp_size: int, rows_per_step: int) -> Loader:
    """The trainer's entry point: rows_per_step rows of cfg.seq_len tokens per step for this rank."""
    return Loader(cfg, seed=seed, dp_rank=dp_rank, dp_size=dp_size, rows_per_step=rows_per_step)
