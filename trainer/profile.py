"""Pipeline-stage profiling: per-rank spans -> Chrome trace, Gantt chart, stage table, bubble.

Everything here is a pure function over records that each rank collected on its own;
gathering them (e.g. `dist.gather_object`) is the caller's job, so this module builds
no process groups and runs in tests without torch.distributed.

Clocks. Every rank measures with `time.perf_counter()` and subtracts its own origin
`t0`, taken right after a `dist.barrier()` at the start of the step, so all ranks share
one time axis up to the barrier's exit skew:

    rank 0: barrier | t0 .F0.m0.SEND_F0.m0.F0.m1 ...
    rank 1: barrier | t0 .RECV_F1.m0.........F1.m0 ...
                      ^ 0 s on every rank

Categories (`Span.category`):

    forward, backward   compute of one chunk on one microbatch (the pipeline's work)
    forward+backward    an FB action: one microbatch's forward and another's backward, node
                        by node, with their expert all-to-alls overlapped (parallel.ep_overlap)
    send, recv          one batched exchange with the neighbours (its sends and receives share
                        the interval: posted together, waited for together)
    dep, optimizer      work outside the pipeline schedule (encoder process, ZeRO-1 step)
    a2a                 an expert all-to-all of a node-by-node pass, from its issue to the wait
                        that consumed it (the Gantt chart draws these on their own track)

Bubble. Only the schedule's spans (forward/backward/send/recv) define the pipeline
window; the optimizer and DEP phases are drawn but do not stretch the makespan.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from parallel.pipeline_runtime import ActionRecord
from parallel.schedule import Action, Op, schedule
from parallel.schedule_sim import simulate

COMPUTE_CATEGORIES = ("forward", "backward", "forward+backward")
SCHEDULE_CATEGORIES = (*COMPUTE_CATEGORIES, "send", "recv")
CATEGORIES = (*SCHEDULE_CATEGORIES, "dep", "optimizer", "a2a")

_CATEGORY_OF_OP = {Op.F: "forward", Op.B: "backward", Op.FB: "forward+backward",
                   Op.SEND_F: "send", Op.SEND_B: "send", Op.RECV_F: "recv", Op.RECV_B: "recv",
                   Op.R: "dep"}


@dataclass(frozen=True)
class Span:
    """One timed piece of work on one rank; seconds on the rank-aligned step axis.

    `stage` and `microbatch` are -1 for spans that belong to no pipeline chunk
    (optimizer, DEP).
    """

    rank: int
    name: str
    category: str
    stage: int
    microbatch: int
    start: float
    end: float

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"span {self.name!r}: category {self.category!r} is not one of "
                             f"{', '.join(CATEGORIES)}")
        if self.end < self.start:
            raise ValueError(f"span {self.name!r} on rank {self.rank} ends ({self.end}) before "
                             f"it starts ({self.start}): pass times from one clock")

    @property
    def duration(self) -> float:
        return self.end - self.start

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Span:
        return cls(**d)


@dataclass(frozen=True)
class RankInfo:
    """Where a rank sits in the job; names its track in traces and its row in tables."""

    rank: int
    pp_rank: int
    dp_rank: int

    @property
    def label(self) -> str:
        return f"rank {self.rank} (pp {self.pp_rank}, dp {self.dp_rank})"


def spans_from_timeline(rank: int, timeline: Sequence[ActionRecord], t0: float) -> list[Span]:
    """The runtime's per-action records as spans, relative to this rank's step origin `t0`
    (DEP's encoder recompute R belongs to no chunk: stage and microbatch -1)."""
    return [Span(rank, "DEP encoder recompute" if r.action.op is Op.R else str(r.action),
                 _CATEGORY_OF_OP[r.action.op], -1 if r.action.op is Op.R else r.action.stage,
                 -1 if r.action.op is Op.R else r.action.microbatch, r.start - t0, r.end - t0)
            for r in timeline]


# ------------------------------------------------------------------ memory

def peak_memory_bytes() -> int:
    """This process's peak memory, in bytes.

    CUDA: `torch.cuda.max_memory_allocated()` (tensors the caching allocator handed out,
    since the last `torch.cuda.reset_peak_memory_stats()`). CPU: the process's peak
    resident set size, `getrusage(RUSAGE_SELF).ru_maxrss` (KiB on Linux), which covers
    everything (interpreter, libraries, tensors) and never goes down over the process's
    life, so it bounds the step's peak from above.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ------------------------------------------------------------------ analysis

def _schedule_spans(spans_per_rank: Sequence[Sequence[Span]]) -> list[list[Span]]:
    out = [[s for s in spans if s.category in SCHEDULE_CATEGORIES] for spans in spans_per_rank]
    if not any(out):
        raise ValueError("no forward/backward/send/recv spans: nothing to measure a pipeline on")
    return out


def pipeline_window(spans_per_rank: Sequence[Sequence[Span]]) -> tuple[float, float]:
    """(first start, last end) of the schedule's spans over all ranks."""
    spans = [s for rank in _schedule_spans(spans_per_rank) for s in rank]
    return min(s.start for s in spans), max(s.end for s in spans)


def _total(spans: Sequence[Span], categories: Sequence[str]) -> float:
    return sum(s.duration for s in spans if s.category in categories)


def _covered(spans: Sequence[Span], categories: Sequence[str]) -> float:
    """Time covered by these spans, overlaps counted once (the sends and receives of one
    batched exchange share its interval)."""
    total, reach = 0.0, float("-inf")
    for s in sorted((s for s in spans if s.category in categories), key=lambda s: s.start):
        if s.end > reach:
            total += s.end - max(s.start, reach)
            reach = s.end
    return total


def measured_bubble_fraction(spans_per_rank: Sequence[Sequence[Span]]) -> float:
    """The simulator's bubble (parallel/schedule_sim.py), measured.

        makespan  = last end - first start of the forward/backward/send/recv spans, all ranks
        compute   = mean over ranks of the rank's forward + backward time
        bubble    = (makespan - compute) / compute

    In the simulator every rank computes the same `ideal`; measured ranks differ (stage 0
    embeds, the last stage computes the loss), hence the mean.
    """
    first, last = pipeline_window(spans_per_rank)
    compute = statistics.fmean(_total(spans, COMPUTE_CATEGORIES) for spans in spans_per_rank)
    if compute <= 0:
        raise ValueError("no forward/backward time on any rank: the bubble is undefined")
    return (last - first - compute) / compute


def replayed_bubble_fraction(spans_per_rank: Sequence[Sequence[Span]],
                             meta: Sequence[RankInfo], pp: int, vpp: int,
                             microbatches: int) -> float:
    """The bubble this step would have had with zero communication and overhead.

    Each data-parallel replica's schedule is simulated (parallel/schedule_sim.py) with every
    forward/backward taking its measured duration, sends and receives taking none; the
    makespan is the longest replica's, the compute the same mean as the measured one's:

        measured bubble - replayed bubble   waiting on messages + the runtime's overhead
        replayed bubble - simulated (F=1,B=2) bubble   unequal stages (embedding, head and
                                                       loss, a colocated encoder), B/F != 2

    On one clock the replay is a lower bound of `measured_bubble_fraction`: in the replay
    every action starts as early as its rank's order and its message allow, and the
    measured run obeys the same constraints (a receive ends after its send started).
    """
    if len(meta) != len(spans_per_rank):
        raise ValueError(f"{len(meta)} RankInfo for {len(spans_per_rank)} ranks: one per rank")
    # an EP-overlap step ran FB pairs (one span each): replay the same schedule
    paired = any(Action.parse(s.name).op is Op.FB for spans in spans_per_rank for s in spans
                 if s.category in COMPUTE_CATEGORIES)
    actions = schedule(pp, vpp, microbatches, ep_overlap=paired)
    makespan = 0.0
    for dp_rank in sorted({info.dp_rank for info in meta}):
        costs = {Action.parse(s.name): s.duration
                 for info, spans in zip(meta, spans_per_rank) if info.dp_rank == dp_rank
                 for s in spans if s.category in COMPUTE_CATEGORIES}
        result = simulate(actions, pp, vpp, microbatches=microbatches, costs=costs)
        makespan = max(makespan, result.makespan)
    compute = statistics.fmean(_total(spans, COMPUTE_CATEGORIES) for spans in spans_per_rank)
    return (makespan - compute) / compute


def stage_table(spans_per_rank: Sequence[Sequence[Span]],
                peak_memory_per_rank: Sequence[int] | None = None,
                activations_per_rank: Sequence[tuple[int, int]] | None = None) -> list[dict]:
    """One row per rank: its stages and where its time inside the pipeline window went;
    `activations_per_rank`: the memory policy's (device, host) peak bytes of saved
    activations over the step (model/saved_tensors.py).

        compute_s    forward_s + backward_s + paired_s (FB actions)
        idle_s       makespan - compute_s (bubble; includes recv waits and loop overhead)
        idle_frac    idle_s / makespan
        comm_wait_s  time blocked in batched sends and receives (part of idle_s)
        slowest_chunk_s  compute of the most expensive chunk (stage) on this rank
    """
    if peak_memory_per_rank is not None and len(peak_memory_per_rank) != len(spans_per_rank):
        raise ValueError(f"peak_memory_per_rank has {len(peak_memory_per_rank)} entries for "
                         f"{len(spans_per_rank)} ranks: give one per rank (or None)")
    first, last = pipeline_window(spans_per_rank)
    makespan = last - first
    rows = []
    for index, spans in enumerate(spans_per_rank):
        forward = _total(spans, ("forward",))
        backward = _total(spans, ("backward",))
        paired = _total(spans, ("forward+backward",))
        per_stage: dict[int, float] = {}
        for s in spans:
            if s.category in COMPUTE_CATEGORIES:
                per_stage[s.stage] = per_stage.get(s.stage, 0.0) + s.duration
        compute = forward + backward + paired
        rows.append({
            "rank": spans[0].rank if spans else index,
            "stages": tuple(sorted(per_stage)),
            "forward_s": forward,
            "backward_s": backward,
            "paired_s": paired,
            "compute_s": compute,
            "idle_s": makespan - compute,
            "idle_frac": (makespan - compute) / makespan if makespan > 0 else 0.0,
            "comm_wait_s": _covered(spans, ("send", "recv")),
            "slowest_chunk_s": max(per_stage.values(), default=0.0),
            "peak_memory_bytes": (None if peak_memory_per_rank is None
                                  else int(peak_memory_per_rank[index])),
            "activation_peak_bytes": (None if activations_per_rank is None
                                      else tuple(activations_per_rank[index])),
        })
    return rows


def slowest_stage(rows: Sequence[dict]) -> dict:
    """The row of the rank with the most compute: the stage the whole pipeline waits on."""
    if not rows:
        raise ValueError("no rows: build them with stage_table first")
    return max(rows, key=lambda row: row["compute_s"])


def format_table(rows: Sequence[dict]) -> str:
    """Fixed-width text of `stage_table` rows (times in ms, memory in MiB)."""
    header = ("rank", "stages", "fwd ms", "bwd ms", "f+b ms", "compute ms", "idle ms", "idle %",
              "comm wait ms", "peak MiB", "act MiB", "offloaded MiB")
    lines = []
    for row in rows:
        memory = row["peak_memory_bytes"]
        activations = row.get("activation_peak_bytes")
        lines.append((
            str(row["rank"]), ",".join(map(str, row["stages"])) or "-",
            f"{row['forward_s'] * 1e3:.1f}", f"{row['backward_s'] * 1e3:.1f}",
            f"{row['paired_s'] * 1e3:.1f}", f"{row['compute_s'] * 1e3:.1f}",
            f"{row['idle_s'] * 1e3:.1f}",
            f"{row['idle_frac'] * 100:.1f}", f"{row['comm_wait_s'] * 1e3:.1f}",
            "-" if memory is None else f"{memory / 2**20:.0f}",
            *(("-", "-") if activations is None else
              (f"{activations[0] / 2**20:.1f}", f"{activations[1] / 2**20:.1f}"))))
    return format_columns(header, lines)


def format_columns(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    out = ["  ".join(cell.rjust(w) for cell, w in zip(header, widths))]
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)
    return "\n".join(out)


# ------------------------------------------------------------------ Chrome trace

def chrome_trace(spans_per_rank: Sequence[Sequence[Span]],
                 meta: Sequence[RankInfo] | None = None, other: dict | None = None) -> dict:
    """Chrome trace-event JSON (chrome://tracing, ui.perfetto.dev): one process per rank.

    Each span is a complete ("X") event in microseconds on thread 0 of process `rank`;
    a rank's spans never overlap (the runtime runs one action at a time), so one track
    per rank holds them all. `meta` names the tracks ("rank 3 (pp 1, dp 0)"); `other`
    lands in the trace's `otherData` (e.g. the configuration that produced it).
    """
    if meta is not None and len(meta) != len(spans_per_rank):
        raise ValueError(f"meta has {len(meta)} entries for {len(spans_per_rank)} ranks")
    events: list[dict] = []
    for index, spans in enumerate(spans_per_rank):
        info = meta[index] if meta is not None else None
        pid = info.rank if info is not None else (spans[0].rank if spans else index)
        label = info.label if info is not None else f"rank {pid}"
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                       "args": {"name": label}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                       "args": {"sort_index": pid}})
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": 0,
                       "args": {"name": "pipeline"}})
        for s in spans:
            args = {} if s.stage < 0 else {"stage": s.stage, "microbatch": s.microbatch}
            events.append({"ph": "X", "name": s.name, "cat": s.category, "pid": pid, "tid": 0,
                           "ts": s.start * 1e6, "dur": s.duration * 1e6, "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": dict(other or {})}


def write_chrome_trace(path: str | os.PathLike, spans_per_rank: Sequence[Sequence[Span]],
                       meta: Sequence[RankInfo] | None = None, other: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(spans_per_rank, meta, other)))
    return path


# ------------------------------------------------------------------ Gantt chart

_FORWARD_COLOURS = ("#4c72b0", "#8fb0de", "#2b4a80", "#b5cbe8")  # one shade per local chunk
_BACKWARD_COLOURS = ("#dd8452", "#f0b48e", "#a85a2c", "#f5cfb4")
_PAIRED_COLOURS = ("#937860", "#c4ad96", "#5e4a36", "#dccbb9")  # FB: forward + backward
_OTHER_COLOURS = {"recv": "#d0d0d0", "send": "#d0d0d0", "optimizer": "#55a868", "dep": "#8172b3",
                  "a2a": "#c44e52"}


def gantt_png(spans_per_rank: Sequence[Sequence[Span]], path: str | os.PathLike, title: str = "",
              meta: Sequence[RankInfo] | None = None) -> Path:
    """Draw one row per rank: forwards blue, backwards orange (a shade per chunk), receive
    waits grey, optimizer green; white is idle. Bars carry their microbatch number.

    Uses matplotlib's Agg canvas directly (no pyplot), so it never touches a display or
    the process-wide backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if meta is not None and len(meta) != len(spans_per_rank):
        raise ValueError(f"meta has {len(meta)} entries for {len(spans_per_rank)} ranks")
    spans_all = [s for spans in spans_per_rank for s in spans]
    if not spans_all:
        raise ValueError("no spans to draw")
    t_min = min(s.start for s in spans_all)
    t_max = max(s.end for s in spans_all)
    scale = 1e3  # ms
    num_ranks = len(spans_per_rank)
    figure = Figure(figsize=(14, 1.0 + 0.7 * num_ranks), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    label_min_width = (t_max - t_min) * 0.012
    for row, spans in enumerate(spans_per_rank):
        y = num_ranks - 1 - row  # rank 0 on top
        stages = sorted({s.stage for s in spans if s.category in COMPUTE_CATEGORIES})
        chunk_of = {stage: i for i, stage in enumerate(stages)}
        for s in spans:
            if s.category == "a2a":  # its own thin track under the rank's row
                axes.broken_barh([((s.start - t_min) * scale, s.duration * scale)],
                                 (y - 0.45, 0.15), facecolors=_OTHER_COLOURS["a2a"],
                                 edgecolors="white", linewidth=0.3)
                continue
            if s.category in COMPUTE_CATEGORIES:
                palette = {"forward": _FORWARD_COLOURS, "backward": _BACKWARD_COLOURS}.get(
                    s.category, _PAIRED_COLOURS)
                colour = palette[chunk_of[s.stage] % len(palette)]
            else:
                colour = _OTHER_COLOURS[s.category]
            axes.broken_barh([((s.start - t_min) * scale, s.duration * scale)], (y - 0.25, 0.65),
                             facecolors=colour, edgecolors="white", linewidth=0.5)
            if s.category in COMPUTE_CATEGORIES and s.duration >= label_min_width:
                label = (str(s.microbatch) if s.category != "forward+backward"
                         else s.name.replace(".m", "."))
                axes.text((s.start - t_min + s.duration / 2) * scale, y + 0.07, label,
                          ha="center", va="center", fontsize=7, color="white")
    labels = [meta[i].label if meta is not None else f"rank {i}" for i in range(num_ranks)]
    axes.set_yticks(range(num_ranks), labels[::-1])
    axes.set_xlim(0, (t_max - t_min) * scale)
    axes.set_ylim(-0.6, num_ranks - 0.4)
    axes.set_xlabel("time since the step started (ms); bar text = microbatch; white = idle")
    axes.set_title(title, loc="left", fontsize=10)
    axes.legend(handles=[Patch(color=_FORWARD_COLOURS[0], label="forward (shade: chunk)"),
                         Patch(color=_BACKWARD_COLOURS[0], label="backward"),
                         Patch(color=_PAIRED_COLOURS[0], label="forward+backward (FB)"),
                         Patch(color=_OTHER_COLOURS["recv"], label="p2p wait"),
                         Patch(color=_OTHER_COLOURS["a2a"], label="all-to-all in flight"),
                         Patch(color=_OTHER_COLOURS["optimizer"], label="optimizer"),
                         Patch(color=_OTHER_COLOURS["dep"], label="DEP")],
                loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=7, fontsize=8,
                frameon=False)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


# ------------------------------------------------------------------ torch.profiler

@contextlib.contextmanager
def torch_profiler_trace(enabled: bool, out_dir: str | os.PathLike, rank: int
                         ) -> Iterator[torch.profiler.profile | None]:
    """Record the block with `torch.profiler` and export `torch_trace_rank{rank}.json`.

    Operator-level detail under the action-level spans above; disabled it costs nothing
    (yields None). CUDA activity is recorded only when CUDA is available.
    """
    if not enabled:
        yield None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        yield prof
    prof.export_chrome_trace(str(out / f"torch_trace_rank{rank}.json"))


# ------------------------------------------------------------------ one profiled training step

def step_spans(rank: int, timeline: Sequence[ActionRecord],
               phases: Sequence[tuple[str, str, float, float]], t0: float) -> list[Span]:
    """A rank's spans of one step: pipeline actions plus the engine's other phases."""
    spans = spans_from_timeline(rank, timeline, t0)
    spans += [Span(rank, name, category, -1, -1, start - t0, end - t0)
              for name, category, start, end in phases]
    return sorted(spans, key=lambda s: s.start)


def write_profile(out_dir: str | os.PathLike, spans_per_rank: Sequence[Sequence[Span]],
                  meta: Sequence[RankInfo], peak_memory: Sequence[int], *, pp: int, vpp: int,
                  microbatches: int, title: str,
                  activations: Sequence[tuple[int, int]] | None = None) -> str:
    """Write trace.json, gantt.png and stages.txt; return the summary text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_chrome_trace(out / "trace.json", spans_per_rank, meta, {"title": title})
    gantt_png(spans_per_rank, out / "gantt.png", title=title, meta=meta)
    rows = stage_table(spans_per_rank, peak_memory, activations)
    slowest = slowest_stage(rows)
    simulated = simulate(schedule(pp, vpp, microbatches), pp, vpp).bubble_fraction
    text = (f"{title}\n{format_table(rows)}\n"
            f"slowest stage: rank {slowest['rank']} (stages {slowest['stages']}), "
            f"compute {slowest['compute_s'] * 1e3:.0f} ms\n"
            f"bubble: measured {measured_bubble_fraction(spans_per_rank):.3f}, replayed "
            f"{replayed_bubble_fraction(spans_per_rank, meta, pp, vpp, microbatches):.3f} "
            f"(measured F/B durations, no communication), simulated {simulated:.3f} "
            f"(pp={pp} vpp={vpp} m={microbatches}, F=1 B=2)\n"
            f"files: {out / 'trace.json'} (chrome://tracing, ui.perfetto.dev), "
            f"{out / 'gantt.png'}\n")
    (out / "stages.txt").write_text(text)
    return text
