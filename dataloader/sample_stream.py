"""The blended stream of sample plans, cut into lanes: one lane per row of the global batch.

Why lanes: a replica must pack its rows of a step without packing everyone else's.
One packer over one global stream makes row j of a step depend on every row before
it, so every rank would have to pack the whole global batch. Instead the stream is
cut into `lanes` = global rows per step independent sub-streams; lane j yields row j
of every step, and a replica packs only its own lanes:

    lanes (G = 8 global rows per step, dp = 4, rows_per_step = 2):
      lane:       0    1  |  2    3  |  4    5  |  6    7
      replica:    0       |  1       |  2       |  3
    each lane: its own sample stream + its own packing buffer + its own state

The lanes do not depend on dp or on the number of workers, so a run resumed with
another dp (same global batch) continues the identical rows; another global batch
changes the lanes and is refused.

Inside a lane, draw n has the global-ish index g = n * lanes + lane (unique across
lanes; the blend schedule and item ids use it) and takes its source from the blend
(`BlendSchedule.source_of(seed, g)`). Which sample of that source: the lane's c-th
draw from source s takes position k of the source's order (order.py), where lanes
take turns over blocks of one shuffle window:

    source order positions:  [ block 0 | block 1 | ... | block G-1 | block G | ... ]
    taken by lane:              0         1               G-1        0
    lane j, its c-th draw:   k = (c // W * G + j) * W + c % W         (W = shuffle_window)

Every position goes to exactly one lane, so an epoch still yields each sample once
over all lanes; a lane reads one window (about two shards) at a time, so whole-shard
reads stay useful. State per lane: draws made, draws per source, samples skipped.

Bad samples the index already flags are skipped here, deterministically (the same
draw is skipped on every run and resume), counted and logged with their key; or, with
data.bad_data=fail, raise naming the key.
"""
from __future__ import annotations

import logging

from dataloader.blend import BlendSchedule
from dataloader.config import LoaderConfig
from dataloader.dataset import Dataset
from dataloader.order import SourceOrder
from dataloader.sample_plan import BadSample, SamplePlan, SampleRef, plan_sample

log = logging.getLogger(__name__)


class SampleStream:
    """What all lanes share: the blend, each source's order, and turning references into plans."""

    def __init__(self, dataset: Dataset, cfg: LoaderConfig, seed: int, lanes: int):
        if lanes < 1:
            raise ValueError(f"lanes={lanes}: the stream needs at least one lane")
        self.dataset, self.cfg, self.seed, self.lanes = dataset, cfg, seed, lanes
        names = dataset.source_names
        self.schedule = BlendSchedule.parse(cfg.blend, names, [s.num_samples for s in dataset.sources])
        self.orders = [SourceOrder(s.shard_sizes, seed=seed, source_id=i, shuffle=cfg.shuffle,
                                   window=cfg.shuffle_window) for i, s in enumerate(dataset.sources)]
        self._shard_base = []
        for s in dataset.sources:
            base, acc = [], 0
            for size in s.shard_sizes:
                base.append(acc)
                acc += size
            self._shard_base.append(base)

    def source_position(self, lane: int, c: int) -> int:
        """Position in a source's order of a lane's c-th draw from that source."""
        w = self.cfg.shuffle_window
        return ((c // w) * self.lanes + lane) * w + c % w

    def ref(self, g: int, source: int, k: int) -> SampleRef:
        epoch, shard, local = self.orders[source].locate(k)
        uid = (source << 40) | (self._shard_base[source][shard] + local)
        return SampleRef(g, source, k, epoch, shard, local, uid)

    def plan(self, ref: SampleRef) -> SamplePlan:
        entry = self.dataset.sample(ref.source, ref.shard, ref.local)
        return plan_sample(entry, ref, self.dataset.shard_key(ref.source, ref.shard), self.cfg, self.seed)


class Lane:
    """One lane's resumable sub-stream of sample plans."""

    def __init__(self, stream: SampleStream, index: int):
        if not 0 <= index < stream.lanes:
            raise ValueError(f"lane {index} outside [0, {stream.lanes})")
        self.stream, self.index = stream, index
        self.drawn = 0
        self.consumed = [0] * len(stream.dataset.sources)
        self.skipped = 0

    def next_ref(self) -> SampleRef:
        """The next draw's reference (which sample), without planning it."""
        s = self.stream
        g = self.drawn * s.lanes + self.index
        source = s.schedule.source_of(s.seed, g)
        k = s.source_position(self.index, self.consumed[source])
        self.drawn += 1
        self.consumed[source] += 1
        return s.ref(g, source, k)

    def next(self) -> SamplePlan:
        while True:
            ref = self.next_ref()
            try:
                return self.stream.plan(ref)
            except BadSample as e:
                if self.stream.cfg.bad_data == "fail":
                    raise BadSample(f"bad data (data.bad_data=fail): {e}") from e
                self.skipped += 1
                log.warning("bad data (skipped): %s (lane %d, global sample %d)", e, self.index, ref.g)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "consumed": list(self.consumed), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if len(state["consumed"]) != len(self.consumed):
            raise ValueError("loader state has a different number of sources than the dataset")
        self.drawn, self.consumed = int(state["drawn"]), [int(c) for c in state["consumed"]]
        self.skipped = int(state["skipped"])
