"""Blending several sources with weights that may change during training.

A schedule is a list of phases, each starting at a global sample index:

    data.blend = "0:text:0.5,captions:0.3,video:0.2;4000:text:0.2,captions:0.4,video:0.4"
    global sample   0 ............ 3999 | 4000 ..............
    weights         text .5 cap .3 ...  | text .2 cap .4 ...

Global sample g takes its source from a hash of (seed, g) against the cumulative
weights of the phase g falls in: a pure function of (seed, g, schedule), so every rank
and every resume agrees, and observed ratios match the weights within sampling error.
Which sample of that source it is comes from how many samples the source has given so
far: that count is part of the loader state (the "blend state"), so resuming is O(1).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def unit_hash(seed: int, index: int) -> float:
    """A uniform float in [0, 1) from (seed, index)."""
    return splitmix64(splitmix64(seed & MASK64) ^ index) / 2.0 ** 64


@dataclass
class BlendSchedule:
    starts: list[int]  # first global sample index of each phase (starts[0] == 0)
    weights: list[list[float]]  # per phase, one normalised weight per source (manifest order)

    @staticmethod
    def parse(spec: str, sources: list[str], sizes: list[int]) -> "BlendSchedule":
        """"" -> weights proportional to source sizes; else "name:w,..." or "start:name:w,...;..."."""
        if not spec.strip():
            total = float(sum(sizes))
            return BlendSchedule([0], [[s / total for s in sizes]])
        starts, weights = [], []
        for phase in spec.split(";"):
            phase = phase.strip()
            start = 0
            head, sep, rest = phase.partition(":")
            if sep and head.strip().isdigit():
                start, phase = int(head), rest
            w = [0.0] * len(sources)
            for item in phase.split(","):
                name, sep, value = item.strip().rpartition(":")
                if not sep or name not in sources:
                    raise ValueError(f"data.blend item {item!r}: expected <source>:<weight> with a "
                                     f"source among {sources}")
                w[sources.index(name)] = float(value)
            if any(x < 0 for x in w) or sum(w) <= 0:
                raise ValueError(f"data.blend phase {phase!r}: weights must be >= 0 with a positive sum")
            starts.append(start)
            weights.append([x / sum(w) for x in w])
        if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"data.blend {spec!r}: phases must start at 0 and increase")
        return BlendSchedule(starts, weights)

    def source_of(self, seed: int, g: int) -> int:
        phase = bisect.bisect_right(self.starts, g) - 1
        u = unit_hash(seed, g)
        acc = 0.0
        w = self.weights[phase]
        for s, x in enumerate(w):
            acc += x
            if u < acc:
                return s
        return max(i for i, x in enumerate(w) if x > 0)
