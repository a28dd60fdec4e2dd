"""The blended global stream of sample plans, with its O(1) resumable state.

    g:       0    1    2    3    4   ...        (global sample index)
    source:  txt  cap  txt  vid  cap ...        (BlendSchedule.source_of(seed, g))
    k:       0    0    1    0    1   ...        (samples that source gave so far: state)
    sample:  SourceOrder(source).locate(k)  ->  (epoch, shard, index in shard)

Bad samples the index already flags are skipped here, deterministically (the same g is
skipped on every run and resume), counted and logged with their key; or, with
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
    def __init__(self, dataset: Dataset, cfg: LoaderConfig, seed: int):
        self.dataset, self.cfg, self.seed = dataset, cfg, seed
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
        self.next_g = 0
        self.consumed = [0] * len(names)
        self.skipped = 0

    def ref(self, g: int, source: int, k: int) -> SampleRef:
        epoch, shard, local = self.orders[source].locate(k)
        uid = (source << 40) | (self._shard_base[source][shard] + local)
        return SampleRef(g, source, k, epoch, shard, local, uid)

    def plan(self, ref: SampleRef) -> SamplePlan:
        entry = self.dataset.sample(ref.source, ref.shard, ref.local)
        return plan_sample(entry, ref, self.dataset.shard_key(ref.source, ref.shard), self.cfg, self.seed)

    def next(self) -> SamplePlan:
        while True:
            g = self.next_g
            source = self.schedule.source_of(self.seed, g)
            k = self.consumed[source]
            self.next_g += 1
            self.consumed[source] += 1
            try:
                return self.plan(self.ref(g, source, k))
            except BadSample as e:
                if self.cfg.bad_data == "fail":
                    raise BadSample(f"bad data (data.bad_data=fail): {e}") from e
                self.skipped += 1
                log.warning("bad data (skipped): %s (global sample %d)", e, g)

    def state_dict(self) -> dict:
        return {"next_g": self.next_g, "consumed": list(self.consumed), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if len(state["consumed"]) != len(self.consumed):
            raise ValueError("loader state has a different number of sources than the dataset")
        self.next_g, self.consumed = int(state["next_g"]), [int(c) for c in state["consumed"]]
        self.skipped = int(state["skipped"])
