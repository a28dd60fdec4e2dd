"""The loader: a deterministic, resumable iterator of `Batch` for one DP rank.

The stream is cut into one lane per row of the global batch (sample_stream.py); a
rank packs the rows of its own replica's lanes only, so its planning cost per step
does not grow with the number of replicas:

    lanes of step n:  [ r0 r1 | r2 r3 | r4 r5 | r6 r7 ]    rows_per_step = 2, dp_size = 4
                        rank 0  rank 1  rank 2  rank 3     each packs and materialises its own

Under DEP a rank also plans (metadata only, from the index) the rows of the other
replicas whose media one DEP plan balances (`plan_replicas`), because the plan needs
their media; it never reads their text. What a rank decodes is its choice (`decode`):

    "own"      the media of its own rows (single process; colocated: pipeline stage 0)
    "none"     nothing: stages that need only tokens, labels, positions, document ids
    callable   select(step, group media) -> item ids: DEP, the items the plan assigns to
               this rank, decoded ahead in the workers and handed over in `Batch.group`

The state after a step is, per lane, (stream position, per-source counts, packer
buffer as sample references, packing counters): small, saved and restored in O(1).
A rank's state holds the lanes it plans; `merge_states` unites the states of all
replicas into the state of the whole job (what a checkpoint stores), from which a
loader with another dp (same global rows per step) or another number of workers
continues the identical rows.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import struct
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from dataloader.batch import Batch, GroupMedia, MediaItem
from dataloader.config import LoaderConfig
from dataloader.dataset import Dataset
from dataloader.materialize import Materializer, MediaRequest, RowResult
from dataloader.packer import Packer
from dataloader.row_layout import PlannedItem, row_items
from dataloader.sample_plan import SamplePlan
from dataloader.sample_stream import Lane, SampleStream
from dataloader.tiered_reader import make_reader
from dataloader.worker_pool import WorkerPool, start_server

log = logging.getLogger(__name__)
STATE_VERSION = 2
Select = Callable[[int, list[tuple[int, MediaItem]]], Iterable[int]]


class LoaderStateError(ValueError):
    pass


class Loader:
    def __init__(self, cfg: LoaderConfig, *, seed: int, dp_rank: int, dp_size: int, rows_per_step: int,
                 plan_replicas: Iterable[int] = (), decode: str | Select = "own"):
        cfg.validate()
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if rows_per_step <= 0:
            raise ValueError(f"rows_per_step={rows_per_step} must be positive")
        if not callable(decode) and decode not in ("own", "none"):
            raise ValueError(f"decode={decode!r}: use 'own', 'none' or a selection function")
        replicas = sorted(set(plan_replicas) | {dp_rank})
        if replicas[0] < 0 or replicas[-1] >= dp_size:
            raise ValueError(f"plan_replicas {replicas} must be replicas in [0, {dp_size})")
        self.cfg, self.seed = cfg, seed
        self.dp_rank, self.dp_size, self.rows_per_step = dp_rank, dp_size, rows_per_step
        self.decode = decode
        self.lanes_total = dp_size * rows_per_step
        if cfg.workers > 0:
            start_server(cfg.worker_start_method)  # boots while we open the dataset
        self.reader = make_reader(cfg)
        self.dataset = Dataset(self.reader, tokenizer_file=cfg.tokenizer, bad_data=cfg.bad_data)
        self.tokenizer = self.dataset.tokenizer
        self.stream = SampleStream(self.dataset, cfg, seed, self.lanes_total)
        self.own_lanes = range(dp_rank * rows_per_step, (dp_rank + 1) * rows_per_step)
        self.planned_replicas = replicas
        lanes = [j for r in replicas for j in range(r * rows_per_step, (r + 1) * rows_per_step)]
        self._lanes = {j: Lane(self.stream, j) for j in lanes}
        self._packers = {j: Packer(cfg.seq_len, cfg.pack_buffer, cfg.max_media_per_row, self._lanes[j].next)
                         for j in lanes}
        self._materializer = Materializer(self.reader, self.tokenizer, cfg, seed)
        # workers boot now, while this process plans the first steps (time to first batch)
        self._pool = (WorkerPool(cfg.workers, cfg.worker_start_method, {
            "cfg": cfg, "seed": seed, "tokenizer_bytes": self.dataset.tokenizer_bytes,
            "version": self.dataset.version}) if cfg.workers > 0 else None)
        self._pending: deque[_PlannedStep] = deque()
        self._planned_steps = 0
        self._started = False
        self._state = self._snapshot()
        self.skipped_keys: list[tuple[str, str]] = []  # bad samples found while materialising
        self.last_step_samples: list[list] = []  # per own row of the last batch: (SampleRef, key)
        self.last_step_decoded: list[int] = []  # item ids this rank decoded for the last batch
        self.items_decoded = 0  # since start: media items decoded here, and their pixel bytes
        self.pixel_bytes_decoded = 0

    @property
    def tokenizer_info(self) -> tuple[int, int, int]:
        """(vocab_size, media_token_id, pad_id)."""
        t = self.tokenizer
        return t.vocab_size, t.media_id, t.pad_id

    @property
    def packing_efficiency(self) -> float:
        """1 - padding / total over this rank's rows returned so far."""
        lanes = [self._state["lanes"][str(j)] for j in self.own_lanes]
        total = sum(lane["tokens_total"] for lane in lanes)
        return sum(lane["tokens_packed"] for lane in lanes) / total if total else 0.0

    @property
    def samples_skipped(self) -> int:
        """Samples of this rank's lanes the index flagged as bad (skipped in the stream)."""
        return sum(self._lanes[j].skipped for j in self.own_lanes)

    # --- state --------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        return {
            "version": STATE_VERSION,
            "dataset_checksum": self.dataset.checksum,
            "stream_checksum": self.cfg.stream_checksum(),
            "seed": self.seed,
            "lanes_total": self.lanes_total,
            "steps": self._planned_steps,
            "lanes": {str(j): {"stream": lane.state_dict(),
                               "buffer": [[p.ref.g, p.ref.source, p.ref.k] for p in self._packers[j].buffer],
                               "tokens_packed": self._packers[j].tokens_packed,
                               "tokens_total": self._packers[j].tokens_total}
                      for j, lane in self._lanes.items()},
        }

    def state_dict(self) -> dict:
        """The state after the last batch returned (not after prefetched ones), for the
        lanes this rank plans; `merge_states` over all replicas gives the job's."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        if self._started:
            raise LoaderStateError("load_state_dict() after iteration started: build a new loader and "
                                   "restore its state before taking the first batch")
        if state.get("version") != STATE_VERSION:
            raise LoaderStateError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION} "
                                   "(a state from before the stream was cut into lanes cannot be continued)")
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
        if state["lanes_total"] != self.lanes_total:
            raise LoaderStateError(
                f"loader state was saved with {state['lanes_total']} rows per step over all replicas, this "
                f"loader makes {self.lanes_total} (dp_size x rows_per_step): each global row is its own "
                "lane of the stream, so keep the global batch (train.global_batch) when resuming; dp may "
                "change")
        missing = [j for j in self._lanes if str(j) not in state["lanes"]]
        if missing:
            raise LoaderStateError(
                f"loader state lacks lanes {missing[:8]} that this loader (replicas "
                f"{self.planned_replicas}) needs: restore the merged state of all replicas "
                "(dataloader.loader.merge_states)")
        for j, lane in self._lanes.items():
            saved = state["lanes"][str(j)]
            lane.load_state_dict(saved["stream"])
            packer = self._packers[j]
            packer.buffer = [self.stream.plan(self.stream.ref(g, s, k)) for g, s, k in saved["buffer"]]
            packer.tokens_packed = int(saved["tokens_packed"])
            packer.tokens_total = int(saved["tokens_total"])
        self._planned_steps = int(state["steps"])
        self._state = self._snapshot()

    # --- iteration ----------------------------------------------------------------------
    def __iter__(self):
        return self

    def _plan_step(self) -> None:
        step = self._planned_steps
        self._planned_steps += 1
        rows = {j: self._packers[j].next_row() for j in sorted(self._lanes)}
        items = {j: row_items(rows[j]) for j in rows}
        own = [rows[j] for j in self.own_lanes]
        group = []  # DEP: the media of every planned replica, (replica, item) in lane order
        if self.decode == "own":
            wanted = {it.item_id for j in self.own_lanes for it in items[j]}
        elif self.decode == "none":
            wanted = set()
        else:
            group = [(j // self.rows_per_step, MediaItem(it.item_id, it.grid_thw, j % self.rows_per_step, it.offset))
                     for j in rows for it in items[j]]
            wanted = set(self.decode(step, group))
        requests = self._media_requests(rows, items, wanted)
        # read-ahead: the shards of this step's own rows and of the own packing buffers
        self.reader.prefetch(dict.fromkeys([p.shard_key for plans in own for p in plans]
                                           + [p.shard_key for j in self.own_lanes
                                              for p in self._packers[j].buffer]))
        if self._pool is not None:
            for i, plans in enumerate(own):
                self._pool.submit((step, "row", i), "row", plans)
            for i, request in enumerate(requests):
                self._pool.submit((step, "media", i), "media", request)
        digest = rows_digest(step, rows) if callable(self.decode) else ""  # only DEP checks it
        self._pending.append(_PlannedStep(step, own, [items[j] for j in self.own_lanes], group,
                                          requests, digest, self._snapshot()))

    def _media_requests(self, rows: dict[int, list[SamplePlan]], items: dict[int, list[PlannedItem]],
                        wanted: set[int]) -> list[MediaRequest]:
        """The wanted items as decode requests, one per media (a video's chunks decode together)."""
        requests: list[MediaRequest] = []
        for j in rows:
            by_media: dict[tuple[int, int], list[PlannedItem]] = {}
            for it in items[j]:
                if it.item_id in wanted:
                    by_media.setdefault((it.sample, it.media), []).append(it)
            for (sample, media), its in by_media.items():
                requests.append(MediaRequest(rows[j][sample], media, [it.chunk for it in its],
                                             [it.item_id for it in its], whole_shard=j in self.own_lanes))
        found = sum(len(r.item_ids) for r in requests)
        if found != len(wanted):
            known = {it.item_id for its in items.values() for it in its}
            raise ValueError(f"asked to decode media items {sorted(wanted - known)[:8]} that are not in "
                             f"the planned rows of replicas {self.planned_replicas}")
        return requests

    def __next__(self) -> Batch:
        self._started = True
        depth = 1 + self.cfg.steps_decoded_ahead
        while len(self._pending) < depth:
            self._plan_step()
        st = self._pending.popleft()
        if self._pool is not None:
            rows = [self._pool.get((st.step, "row", i)) for i in range(len(st.own))]
            media = [self._pool.get((st.step, "media", i)) for i in range(len(st.requests))]
        else:
            rows = [self._materializer.row(plans) for plans in st.own]
            media = [self._materializer.media(r) for r in st.requests]
        self._state = st.state
        self.last_step_samples = [[(p.ref, p.key) for p in plans] for plans in st.own]
        pixels: dict[int, torch.Tensor] = {}
        for request, result in zip(st.requests, media):
            self._report(result.skipped)
            for item_id, patches in zip(request.item_ids, result.patches):
                pixels[item_id] = torch.from_numpy(patches)
                self.pixel_bytes_decoded += patches.nbytes
        self.last_step_decoded = list(pixels)
        self.items_decoded += len(pixels)
        batch = self._to_batch(rows, st.own_items, pixels)
        if callable(self.decode):
            batch.group = GroupMedia(st.step, st.group, pixels, st.digest)
        return batch

    def _report(self, skipped: list) -> None:
        for key, reason in skipped:
            log.warning("bad data (skipped): %s: %s", key, reason)
            self.skipped_keys.append((key, reason))

    def _to_batch(self, results: list[RowResult], own_items: list[list[PlannedItem]],
                  pixels: dict[int, torch.Tensor]) -> Batch:
        media = []
        for row, (r, its) in enumerate(zip(results, own_items)):
            self._report(r.skipped)
            media.extend(MediaItem(it.item_id, it.grid_thw, row, it.offset, pixels.get(it.item_id))
                         for it in its)
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


@dataclass
class _PlannedStep:
    step: int
    own: list[list[SamplePlan]]  # this replica's rows
    own_items: list[list[PlannedItem]]  # their media items, per row
    group: list[tuple[int, MediaItem]]  # media metadata of every planned replica
    requests: list[MediaRequest]  # what this rank decodes
    digest: str
    state: dict  # the loader state after this step


def rows_digest(step: int, rows: dict[int, list[SamplePlan]]) -> str:
    """sha256 of which samples fill which planned row of a step (global index, length, items)."""
    words = [step]
    for j in sorted(rows):
        words += [j, len(rows[j])]
        for p in rows[j]:
            words += [p.ref.g, p.length, p.num_items]
    return hashlib.sha256(struct.pack(f"<{len(words)}q", *words)).hexdigest()


def merge_states(states: Iterable[dict]) -> dict:
    """One state for the whole job from the states of ranks that each hold some lanes.

    Every state must come from the same run and step; a lane held by several ranks must
    be identical in all of them (ranks that planned the same lane agree, or the data of
    the run diverged)."""
    states = [s for s in states if s is not None]
    if not states:
        raise LoaderStateError("no loader state to merge")
    first = states[0]
    merged = {k: v for k, v in first.items() if k != "lanes"}
    merged["lanes"] = {}
    for s in states:
        for key in ("version", "dataset_checksum", "stream_checksum", "seed", "lanes_total", "steps"):
            if s.get(key) != first.get(key):
                raise LoaderStateError(f"loader states disagree on {key} ({s.get(key)!r} vs "
                                       f"{first.get(key)!r}): they are not from the same run and step")
        for j, lane in s["lanes"].items():
            if merged["lanes"].setdefault(j, lane) != lane:
                raise LoaderStateError(f"two ranks hold different states of lane {j}: their data "
                                       "diverged (different seed, dataset or loader settings)")
    return merged


def build_loader(cfg: LoaderConfig, *, seed: int, dp_rank: int, dp_size: int, rows_per_step: int,
                 plan_replicas: Iterable[int] = (), decode: str | Select = "own") -> Loader:
    """The trainer's entry point: rows_per_step rows of cfg.seq_len tokens per step for this rank.

    `plan_replicas` and `decode` are for DEP and pipeline stages (see the module docstring)."""
    return Loader(cfg, seed=seed, dp_rank=dp_rank, dp_size=dp_size, rows_per_step=rows_per_step,
                  plan_replicas=plan_replicas, decode=decode)
