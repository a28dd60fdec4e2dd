"""Which layers live in which pipeline chunk: the one place that decides it.

K2.5 has 61 decoder layers (a prime), so no pp > 1 splits them evenly; its first
layer is dense and its head + loss (vocabulary 163,840) costs about two decoder
layers. A layout is the list of the pp x vpp chunks in global stage order (rank r
holds stages r, r + pp, ...; parallel/schedule.py), each a `model.lm.ChunkSpec`:
the embedding or not, a range of decoder layers (possibly empty), the head or not.
A chunk may be embedding-only, head-only or hold no MoE layer; everything
downstream (router biases, ZeRO-1 groups, DEP on stage 0, checkpoints, profiles)
takes the chunk's modules as they come.

Explicit layouts use Megatron-Core's notation (`--pipeline-model-parallel-layout`):

    E     the token embedding and the media merge          opens chunk 0
    t     one decoder layer (dense for the first model.lm.first_k_dense, then MoE)
    L     the final norm, the head and the loss            closes the last chunk
    |     the boundary between two chunks
    X*N   X repeated N times; X is one symbol or a (group): "(tt|)*3" = "tt|tt|tt|"

    "Et|(tt|)*30L"   K2.5 at pp=16 vpp=2: E + the dense layer, thirty chunks of two
                     MoE layers, the head alone (what `auto` picks for it)

The automatic layout (`parallel.layout = "auto"`, the default) cuts the sequence
E t t ... t L into pp x vpp contiguous, non-empty chunks minimising, in order:

    1. the largest chunk's compute: forward FLOPs per microbatch from model/flops.py
       (the slowest chunk paces the pipeline);
    2. the largest chunk's parameters on one rank (routed experts divided over ep), so
       ties go to the layout whose fullest chunk holds the least weight memory;
    3. the sum of squared chunk compute (the remaining slack spread evenly).

Each criterion is an exact dynamic program over the cut points, O(chunks x items^2),
constrained by the optimum of the criteria before it. For `tiny` at pp=2 (vpp 1 or
2) it picks the even split the project used before layouts existed.

Known limit: it balances chunks, not ranks; a rank runs vpp chunks and the ranks'
totals may differ by up to a chunk's slack (`launch.plan` prints them per rank).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from model.config import ConfigError, LMConfig
from model.flops import lm_part_flops
from model.lm import ChunkSpec
from model.param_count import decoder_layer_params, embedding_params, head_params

EMBED, LAYER, HEAD, BOUNDARY = "E", "t", "L", "|"


class LayoutError(ConfigError):
    """A parallel layout that cannot run; the message says what to change."""


@dataclass(frozen=True)
class PipelineLayout:
    chunks: tuple[ChunkSpec, ...]  # global stage order

    def symbols(self) -> list[str]:
        """Each chunk as a string of E/t/L."""
        return [EMBED * c.embed + LAYER * len(c.layers) + HEAD * c.head for c in self.chunks]

    def notation(self) -> str:
        """The layout in the notation `parse_layout` reads, runs of equal chunks folded."""
        chunks = [re.sub(r"t{3,}", lambda m: f"t*{len(m.group())}", c) for c in self.symbols()]
        runs: list[list] = []
        for chunk in chunks:
            if runs and runs[-1][0] == chunk:
                runs[-1][1] += 1
            else:
                runs.append([chunk, 1])
        parts = []
        for index, (chunk, count) in enumerate(runs):
            last = index == len(runs) - 1
            repeated = count - 1 if last else count
            if repeated == 1:
                parts.append(chunk + BOUNDARY)
            elif repeated > 1:
                parts.append(f"({chunk}{BOUNDARY})*{repeated}")
            if last:
                parts.append(chunk)
        return "".join(parts)


# ---------------------------------------------------------------- explicit layouts


def expand_notation(text: str) -> str:
    """'Et|(tt|)*2L' -> 'Et|tt|tt|L' (whitespace ignored); refuses anything else."""
    source = re.sub(r"\s+", "", text)
    position = 0

    def fail(message: str) -> LayoutError:
        return LayoutError(f"parallel.layout={text!r}: {message} at character {position}; "
                           f"write chunks of E (embedding), t (decoder layer) and L (head + "
                           f"loss) separated by |, with X*N or (group)*N for repetition, e.g. "
                           f"'Et|(tt|)*3L'")

    def sequence(closing: bool) -> str:
        nonlocal position
        out = []
        while position < len(source):
            char = source[position]
            if char == ")":
                if not closing:
                    raise fail("unmatched ')'")
                return "".join(out)
            if char == "(":
                position += 1
                item = sequence(closing=True)
                if position >= len(source) or source[position] != ")":
                    raise fail("unclosed '('")
                position += 1
            elif char in (EMBED, LAYER, HEAD, BOUNDARY):
                item = char
                position += 1
            else:
                raise fail(f"unknown symbol {char!r}")
            repeat = re.match(r"\*(\d+)", source[position:])
            if repeat:
                item *= int(repeat.group(1))
                position += len(repeat.group())
            elif source[position:position + 1] == "*":
                raise fail("'*' needs a repeat count")
            out.append(item)
        if closing:
            raise fail("unclosed '('")
        return "".join(out)

    return sequence(closing=False)


def parse_layout(text: str, cfg: LMConfig, stages: int) -> PipelineLayout:
    """An explicit layout, checked against the model (layers) and the schedule (chunks)."""
    chunks = expand_notation(text).split(BOUNDARY)
    where = f"parallel.layout={text!r}"
    if len(chunks) != stages:
        raise LayoutError(f"{where} has {len(chunks)} chunks but parallel.pp x parallel.vpp = "
                          f"{stages}: give one chunk per virtual stage (chunks are separated by "
                          f"'|') or change pp/vpp")
    layers = sum(c.count(LAYER) for c in chunks)
    if layers != cfg.layers:
        raise LayoutError(f"{where} places {layers} decoder layers (t) but the model has "
                          f"model.lm.layers={cfg.layers}")
    joined = "".join(chunks)
    if joined.count(EMBED) != 1 or not chunks[0].startswith(EMBED):
        raise LayoutError(f"{where}: the embedding E must appear once, first in chunk 0 "
                          "(stage 0 takes the tokens and the media)")
    if joined.count(HEAD) != 1 or not chunks[-1].endswith(HEAD):
        raise LayoutError(f"{where}: the head L must appear once, last in the last chunk "
                          "(the last stage computes the loss)")
    for index, chunk in enumerate(chunks):
        if not chunk:
            raise LayoutError(f"{where}: chunk {index} is empty; every virtual stage needs E, "
                              "a t or L (fewer chunks: lower pp or vpp)")
    return _from_symbols(chunks)


def _from_symbols(chunks: list[str]) -> PipelineLayout:
    specs, next_layer = [], 0
    for chunk in chunks:
        count = chunk.count(LAYER)
        specs.append(ChunkSpec(EMBED in chunk, range(next_layer, next_layer + count),
                               HEAD in chunk))
        next_layer += count
    return PipelineLayout(tuple(specs))


# ---------------------------------------------------------------- automatic layouts


@dataclass(frozen=True)
class ItemCost:
    """One indivisible piece of the LM for the layout's cost model."""

    symbol: str  # E, t or L
    flops: float  # forward FLOPs per microbatch
    params: int  # parameters one rank holds for it


def item_costs(cfg: LMConfig, *, seq_len: int, micro_batch: int, ep: int) -> list[ItemCost]:
    """E, every decoder layer, L, with compute for rows of one document of `seq_len`
    tokens (causal attention sees (S+1)/2 keys per query on average)."""
    tokens = micro_batch * seq_len
    attended = micro_batch * seq_len * (seq_len + 1) / 2

    def flops(dense: int = 0, moe: int = 0, head: bool = False) -> float:
        return lm_part_flops(cfg, dense_layers=dense, moe_layers=moe, head=head, tokens=tokens,
                             attended_total=attended).forward

    items = [ItemCost(EMBED, 0.0, embedding_params(cfg))]
    for layer in range(cfg.layers):
        dense = layer < cfg.first_k_dense
        items.append(ItemCost(LAYER, flops(dense=int(dense), moe=int(not dense)),
                              decoder_layer_params(cfg, layer, cfg.num_experts // ep)))
    items.append(ItemCost(HEAD, flops(head=True), head_params(cfg)))
    return items


def _best_cuts(costs: list[ItemCost], stages: int, *, key: Callable[[float, float], float],
               combine: Callable[[float, float], float],
               allowed: Callable[[float, float], bool]) -> tuple[float, list[int]]:
    """Exact DP over contiguous, non-empty chunks: minimise `combine`-folded `key(flops,
    params)` of the chunks, using only chunks that are `allowed`. Returns (value, cuts) with
    cuts[k] the first item of chunk k+1."""
    n = len(costs)
    prefix_flops, prefix_params = [0.0], [0.0]
    for c in costs:
        prefix_flops.append(prefix_flops[-1] + c.flops)
        prefix_params.append(prefix_params[-1] + c.params)
    inf = math.inf
    # best[k][j]: value of the first j items cut into k chunks; choice[k][j]: start of chunk k
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    choice = [[-1] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = None  # no chunk yet: combine() starts from the first chunk's own value
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(k - 1, j):
                before = best[k - 1][i]
                if before == inf:
                    continue
                f, p = prefix_flops[j] - prefix_flops[i], prefix_params[j] - prefix_params[i]
                if not allowed(f, p):
                    continue
                value = key(f, p) if before is None else combine(before, key(f, p))
                if value < best[k][j]:
                    best[k][j], choice[k][j] = value, i
    if best[stages][n] == inf:
        raise LayoutError("no layout satisfies the balancing constraints (internal error)")
    cuts, j = [], n
    for k in range(stages, 0, -1):
        j = choice[k][j]
        cuts.append(j)
    return best[stages][n], sorted(cuts)[1:]


def auto_layout(costs: list[ItemCost], stages: int) -> PipelineLayout:
    """Balance `costs` (E, t..., L) over `stages` chunks; see the module docstring."""
    if len(costs) < stages:
        layers = len(costs) - 2
        raise LayoutError(f"{layers} decoder layers + the embedding + the head are {len(costs)} "
                          f"pieces, fewer than parallel.pp x parallel.vpp = {stages} chunks: "
                          "lower pp or vpp")
    slack = 1 + 1e-9  # float sums of the same chunk may differ in the last bits
    everything = lambda f, p: True  # noqa: E731
    max_flops, _ = _best_cuts(costs, stages, key=lambda f, p: f, combine=max, allowed=everything)
    fast = lambda f, p: f <= max_flops * slack  # noqa: E731
    max_params, _ = _best_cuts(costs, stages, key=lambda f, p: p, combine=max, allowed=fast)
    _, cuts = _best_cuts(costs, stages, key=lambda f, p: f * f, combine=lambda a, b: a + b,
                         allowed=lambda f, p: fast(f, p) and p <= max_params * slack)
    bounds = [0, *cuts, len(costs)]
    return _from_symbols(["".join(c.symbol for c in costs[a:b])
                          for a, b in zip(bounds, bounds[1:])])


def resolve_layout(layout: str, cfg: LMConfig, *, pp: int, vpp: int, seq_len: int,
                   micro_batch: int, ep: int) -> PipelineLayout:
    """`parallel.layout` ("auto" or the notation above) for this model and schedule."""
    stages = pp * vpp
    if layout.strip() == "auto":
        return auto_layout(item_costs(cfg, seq_len=seq_len, micro_batch=micro_batch, ep=ep),
                           stages)
    return parse_layout(layout, cfg, stages)
