"""The order in which one source's samples are read: a pure function of
(seed, source, epoch, position), computable in O(1) for any position (after an
O(#shards) table per epoch), so resuming never replays the stream.

One epoch of a source with shards A..E (shuffle on, window W samples):

    shards, permuted by (seed, source, epoch):   C  A  E  B  D
    their samples, concatenated:                 c0 c1 c2 a0 a1 a2 e0 e1 b0 b1 b2 d0 ...
    cut into windows of W, each permuted by      [a0 c2 c0 a1 | b0 e1 c1 ... ]  (W = 4 here)
      (seed, source, epoch, window):
    position p of the epoch -> the p-th sample of that sequence

A window spans about W / samples-per-shard shards, so reads stay nearly sequential
while samples still mix across shards. Different epochs give different orders.
"""
from __future__ import annotations

import bisect
from functools import lru_cache

import numpy as np


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([k & 0xFFFFFFFF for k in key])))


class SourceOrder:
    def __init__(self, shard_sizes: list[int], *, seed: int, source_id: int, shuffle: bool, window: int):
        if not shard_sizes or sum(shard_sizes) == 0:
            raise ValueError(f"source {source_id} has no samples")
        self.shard_sizes = list(shard_sizes)
        self.num_samples = sum(shard_sizes)
        self.seed, self.source_id, self.shuffle, self.window = seed, source_id, shuffle, window
        # lanes (sample_stream.py) read many windows at once, and lanes of a small source
        # sit in different epochs: keep enough of both for a loader's lanes
        self._epoch_table = lru_cache(maxsize=256)(self._make_epoch_table)
        self._window_perm = lru_cache(maxsize=4096)(self._make_window_perm)

    def _make_epoch_table(self, epoch: int) -> tuple[list[int], list[int]]:
        """(shard order, start offset of each in the epoch's concatenation)."""
        n = len(self.shard_sizes)
        order = (_rng(self.seed, self.source_id, epoch, 1).permutation(n).tolist()
                 if self.shuffle else list(range(n)))
        starts, total = [], 0
        for s in order:
            starts.append(total)
            total += self.shard_sizes[s]
        return order, starts

    def _make_window_perm(self, epoch: int, window: int) -> list[int]:
        length = min(self.window, self.num_samples - window * self.window)
        return _rng(self.seed, self.source_id, epoch, 2, window).permutation(length).tolist()

    def locate(self, k: int) -> tuple[int, int, int]:
        """(epoch, shard id, sample index inside the shard) of the k-th sample drawn."""
        epoch, p = divmod(k, self.num_samples)
        if self.shuffle:
            w, r = divmod(p, self.window)
            p = w * self.window + self._window_perm(epoch, w)[r]
        order, starts = self._epoch_table(epoch)
        j = bisect.bisect_right(starts, p) - 1
        return epoch, order[j], p - starts[j]
