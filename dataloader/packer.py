"""Best-fit packing of sample plans into fixed-length rows over a bounded buffer.

    buffer (pack_buffer plans, oldest first):  [a:300] [b:90] [c:200] [d:40] ...
    row of 512:  take the OLDEST first (no sample waits forever)        a:300   used 300
                 refill, then the LONGEST that still fits (ties: oldest) c:200   used 500
                 refill, longest that fits in 12 ... none -> row done, 12 padding

A row also holds at most max_media_per_row media items. Every plan pulled from the
stream ends up in exactly one row, in order of decision: nothing is lost or duplicated.
The buffer's contents (sample references) are part of the loader state.
"""
from __future__ import annotations

from typing import Callable

from dataloader.sample_plan import SamplePlan


class Packer:
    def __init__(self, seq_len: int, buffer_size: int, max_media: int, pull: Callable[[], SamplePlan]):
        self.seq_len, self.buffer_size, self.max_media, self.pull = seq_len, buffer_size, max_media, pull
        self.buffer: list[SamplePlan] = []
        self.tokens_packed = 0
        self.tokens_total = 0

    def _fill(self) -> None:
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self.pull())

    def next_row(self) -> list[SamplePlan]:
        self._fill()
        first = self.buffer.pop(0)
        row, used, media = [first], first.length, first.num_items
        while True:
            self._fill()
            best = -1
            for i, plan in enumerate(self.buffer):
                if (plan.length <= self.seq_len - used and media + plan.num_items <= self.max_media
                        and (best < 0 or plan.length > self.buffer[best].length)):
                    best = i
            if best < 0:
                break
            plan = self.buffer.pop(best)
            row.append(plan)
            used += plan.length
            media += plan.num_items
        self.tokens_packed += used
        self.tokens_total += self.seq_len
        return row

    @property
    def efficiency(self) -> float:
        """1 - padding / total over every row packed so far."""
        return self.tokens_packed / self.tokens_total if self.tokens_total else 0.0
