"""Check a pipeline schedule and simulate its timeline, without running a model.

Two models of point-to-point communication:

  buffered (gloo's semantics, the default):
    F, B     run for forward_cost / backward_cost on their rank
    SEND_*   take no time and never block
    RECV_*   block until the matching SEND has run on the other rank; the message arrives at
             that SEND's time (+ p2p_latency, 0 by default)

    rank 0:  F0.m0 SEND_F0.m0 ......
    rank 1:  RECV_F1.m0 [waits until rank 0 ran SEND_F0.m0] F1.m0 ...

  rendezvous (NCCL's semantics, `rendezvous=True`; what parallel/pipeline_runtime.py runs):
    consecutive SEND/RECV actions of a rank form ONE batch (`comm_batches`), posted together
    (batch_isend_irecv) and waited for together. An operation completes only when its peer
    has posted the matching operation; the rank waits until every operation of its batch
    has. So a send that faces a send blocks both ranks, unless each batch also holds the
    receive of the other's send:

        rank 0: F0.m1 [SEND_F0.m1 RECV_B0.m0] B0.m0      one batch each: both complete
        rank 1: B1.m0 [SEND_B1.m0 RECV_F1.m1] F1.m1

    NCCL also matches the messages between two ranks in posting order (no tags):
    `check_fifo` requires that, on every directed pair of ranks, the sender posts its
    SENDs in the order the receiver posts the matching RECVs.

Each rank runs its list strictly in order, so a rank's times depend only on its own list and
on the send times of the others. The simulator therefore advances every rank as far as it can,
repeatedly; the result equals an event-queue simulation, and a sweep in which no rank moves
while some still have actions left is a deadlock.

DEP's encoder recompute (R, parallel/dep_bubbles.py; rendezvous mode only) runs for
`recompute_cost` on its rank; right after a communication batch it runs while that batch
is in flight (posted, then R, then waited for), as the runtime runs it. It is not pipeline
work, so it is left out of `busy_time_per_rank` and of the ideal: the makespan shows
whether the bubble hid it.

Bubble: every rank computes microbatches * vpp * (forward_cost + backward_cost) (the ideal);
bubble_fraction = (makespan - ideal) / ideal. For (interleaved) 1F1B theory gives
(pp - 1) / (vpp * microbatches). With per-action `costs` (e.g. measured durations, to replay
a profiled step) ranks compute different amounts and the ideal is their mean.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

from parallel.schedule import (COMM_OPS, COMPUTE_OPS, RECV_OPS, SEND_OPS, Action, Op,
                               comm_batches, stage_owner)


class ScheduleError(ValueError):
    """The schedule is malformed: an action is missing, duplicated, misplaced or out of order."""


class ScheduleDeadlock(RuntimeError):
    """No rank can progress: each rank with actions left waits on a SEND that never runs."""


@dataclass(frozen=True)
class ActionTiming:
    """When one action ran. For a RECV, start..end is the time spent waiting for the message."""

    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class SimResult:
    makespan: float
    ideal: float
    busy_time_per_rank: list[float]
    timeline_per_rank: list[list[ActionTiming]]

    @property
    def bubble_fraction(self) -> float:
        return (self.makespan - self.ideal) / self.ideal


def matching_send(recv: Action) -> Action:
    """The SEND (on the neighbour rank) a RECV waits for."""
    if recv.op is Op.RECV_F:
        return Action(Op.SEND_F, recv.stage - 1, recv.microbatch)
    if recv.op is Op.RECV_B:
        return Action(Op.SEND_B, recv.stage + 1, recv.microbatch)
    raise ValueError(f"{recv} is not a RECV")


def matching_recv(send: Action) -> Action:
    """The RECV (on the neighbour rank) that consumes a SEND."""
    if send.op is Op.SEND_F:
        return Action(Op.RECV_F, send.stage + 1, send.microbatch)
    if send.op is Op.SEND_B:
        return Action(Op.RECV_B, send.stage - 1, send.microbatch)
    raise ValueError(f"{send} is not a SEND")


def _prerequisite(action: Action, rank: int, pp: int, last_stage: int) -> list[Action]:
    """Actions that must have run earlier on `rank` (the same rank) before `action`; for an
    FB, what either part needs (a part that needs the other cannot pair)."""
    if action.op is Op.FB:
        return [need for part in action.parts
                for need in _prerequisite(part, rank, pp, last_stage)]
    stage, microbatch = action.stage, action.microbatch
    if action.op is Op.F:
        if stage == 0:
            return []
        if stage_owner(stage - 1, pp) != rank:
            return [Action(Op.RECV_F, stage, microbatch)]
        return [Action(Op.F, stage - 1, microbatch)]  # handed over locally (pp == 1)
    if action.op is Op.B:
        needs = [Action(Op.F, stage, microbatch)]
        if stage < last_stage:
            if stage_owner(stage + 1, pp) != rank:
                needs.append(Action(Op.RECV_B, stage, microbatch))
            else:
                needs.append(Action(Op.B, stage + 1, microbatch))
        return needs
    if action.op is Op.SEND_F:
        return [Action(Op.F, stage, microbatch)]
    if action.op is Op.SEND_B:
        return [Action(Op.B, stage, microbatch)]
    return []


def _peer_stage(action: Action) -> int:
    """The stage on the other end of a SEND/RECV."""
    return action.stage + 1 if action.op in (Op.SEND_F, Op.RECV_B) else action.stage - 1


def check_schedule(
    actions_per_rank: list[list[Action]], pp: int, vpp: int, microbatches: int
) -> None:
    """Everything that can be checked without time; raises ScheduleError on the first problem.

    Each (stage, microbatch) has exactly one F and one B, all actions sit on the rank owning
    their stage, every SEND has exactly one matching RECV and vice versa, SEND/RECV only cross
    ranks, and on each rank every action comes after what it needs (F before its B, the input
    RECV before the F, the produced tensor before its SEND).
    """
    if len(actions_per_rank) != pp:
        raise ScheduleError(
            f"expected {pp} per-rank action lists (pp={pp}), got {len(actions_per_rank)}"
        )
    num_stages = pp * vpp
    last_stage = num_stages - 1
    counts = Counter(part for actions in actions_per_rank for action in actions
                     for part in action.parts)
    duplicates = sorted(str(action) for action, n in counts.items() if n > 1)
    if duplicates:
        raise ScheduleError(f"actions scheduled more than once: {', '.join(duplicates)}")

    for rank, actions in enumerate(actions_per_rank):
        if sum(a.op is Op.R for a in actions) > 1:
            raise ScheduleError(f"rank {rank} has more than one R (DEP encoder recompute)")
        done: set[Action] = set()
        for position, action in enumerate(actions):
            where = f"{action} (rank {rank}, position {position})"
            for part in action.parts:
                if part.stage > last_stage:
                    raise ScheduleError(f"{where}: stage out of range 0..{last_stage}")
                if part.microbatch >= microbatches:
                    raise ScheduleError(f"{where}: microbatch out of range 0..{microbatches - 1}")
                owner = stage_owner(part.stage, pp)
                if owner != rank:
                    raise ScheduleError(f"{where}: stage {part.stage} is held by rank {owner}")
            if action.op in SEND_OPS or action.op in RECV_OPS:
                peer = _peer_stage(action)
                if not 0 <= peer <= last_stage or stage_owner(peer, pp) == rank:
                    raise ScheduleError(
                        f"{where}: stage {peer} is not on another rank, so nothing is sent "
                        f"or received here; remove this action"
                    )
            for needed in _prerequisite(action, rank, pp, last_stage):
                if needed not in done:
                    raise ScheduleError(f"{where}: needs {needed} earlier on rank {rank}")
            done.update(action.parts)

    for stage in range(num_stages):
        for microbatch in range(microbatches):
            for op in (Op.F, Op.B):
                if Action(op, stage, microbatch) not in counts:
                    raise ScheduleError(
                        f"missing {Action(op, stage, microbatch)} "
                        f"(belongs on rank {stage_owner(stage, pp)})"
                    )
    for action in counts:
        if action.op in SEND_OPS and matching_recv(action) not in counts:
            raise ScheduleError(f"{action} is never received: no {matching_recv(action)}")
        if action.op in RECV_OPS and matching_send(action) not in counts:
            raise ScheduleError(f"{action} waits forever: no {matching_send(action)}")


def simulate(
    actions_per_rank: list[list[Action]],
    pp: int,
    vpp: int,
    forward_cost: float | Callable[[int, int], float] = 1.0,
    backward_cost: float | Callable[[int, int], float] = 2.0,
    *,
    microbatches: int | None = None,
    p2p_latency: float = 0.0,
    costs: Mapping[Action, float] | None = None,
    rendezvous: bool = False,
    a2a_cost: float = 0.0,
    recompute_cost: float = 1.0,
) -> SimResult:
    """Check, then time the schedule; raises ScheduleError / ScheduleDeadlock if it cannot run.

    Costs are one number for every chunk, or a function of (global stage, microbatch):
    the planner's times of uneven chunks and of microbatches whose media differ. With
    such costs `ideal` is the busiest rank's compute, so the bubble is the idle time the
    schedule adds to the slowest rank.
    `rendezvous=True` uses NCCL's semantics (module docstring) instead of buffered sends.
    `a2a_cost`: the part of each F and each B spent in expert all-to-alls. An FB runs both
    with each one's all-to-alls under the other's compute, so it takes
    max(compute of both, all-to-alls of both) instead of the sum of F and B.
    `microbatches` defaults to one more than the largest microbatch index in the schedule;
    pass it to also catch a schedule that leaves out the last microbatches entirely.
    `costs` gives each F/B action its own duration (a profiled step replayed) instead of
    forward_cost/backward_cost; `ideal` is then the ranks' mean compute.
    `recompute_cost`: the duration of each R action (DEP's encoder recompute), if any. R is
    simulated with `rendezvous=True` only (the runtime's semantics: an R right after a
    communication batch runs between posting the batch and waiting for it).
    """
    if microbatches is None:
        indices = [action.microbatch for actions in actions_per_rank for action in actions]
        if not indices:
            raise ScheduleError("the schedule has no actions")
        microbatches = max(indices) + 1
    variable = callable(forward_cost) or callable(backward_cost)
    cost = {op: c if callable(c) else (lambda stage, microbatch, c=c: c)
            for op, c in ((Op.F, forward_cost), (Op.B, backward_cost))}
    smallest = min(cost[op](stage, mb) for op in (Op.F, Op.B) for stage in range(pp * vpp)
                   for mb in range(microbatches))
    if smallest <= 0 or p2p_latency < 0:
        raise ValueError(
            f"costs must be > 0 and p2p_latency >= 0, got forward_cost={forward_cost}, "
            f"backward_cost={backward_cost} (smallest {smallest}), p2p_latency={p2p_latency}"
        )
    check_schedule(actions_per_rank, pp, vpp, microbatches)
    if costs is not None:
        wrong = [f"{a}: {costs.get(a)}" for actions in actions_per_rank for a in actions
                 if a.op in COMPUTE_OPS and not costs.get(a, 0.0) > 0]
        if wrong:
            raise ValueError(f"costs must give every F/B action a duration > 0; "
                             f"not so for {', '.join(wrong[:4])}")
    if not 0 <= a2a_cost <= smallest:
        raise ValueError(f"a2a_cost={a2a_cost} must lie in [0, smallest F or B cost={smallest}]")

    def duration(action: Action) -> float:
        if action.op is Op.R:
            return recompute_cost
        if costs is not None:
            return costs[action]
        if action.op is Op.FB:  # an FB's overlap makes a rank less busy
            f = cost[Op.F](action.stage, action.microbatch)
            b = cost[Op.B](action.b_stage, action.b_microbatch)
            return max(f + b - 2 * a2a_cost, 2 * a2a_cost)
        return cost[action.op](action.stage, action.microbatch)

    if costs is not None:
        ideal_of = statistics.fmean
    elif variable:
        ideal_of = max
    else:
        ideal_of = lambda busy: microbatches * vpp * (forward_cost + backward_cost)  # noqa: E731
    if not rendezvous and any(a.op is Op.R for actions in actions_per_rank for a in actions):
        raise ValueError("R actions (DEP's encoder recompute) are simulated with "
                         "rendezvous=True, the runtime's semantics")
    if rendezvous:
        check_fifo(actions_per_rank, pp)
        clock, busy, timeline = _simulate_rendezvous(actions_per_rank, pp, duration, p2p_latency)
        return SimResult(max(clock), ideal_of(busy), busy, timeline)

    arrival: dict[Action, float] = {}  # SEND -> time its message is available to the RECV
    clock = [0.0] * pp
    position = [0] * pp
    busy = [0.0] * pp
    timeline: list[list[ActionTiming]] = [[] for _ in range(pp)]
    remaining = sum(len(actions) for actions in actions_per_rank)
    while remaining:
        progressed = False
        for rank, actions in enumerate(actions_per_rank):
            while position[rank] < len(actions):
                action = actions[position[rank]]
                start = clock[rank]
                if action.op in RECV_OPS:
                    send = matching_send(action)
                    if send not in arrival:
                        break
                    end = max(start, arrival[send])
                elif action.op in SEND_OPS:
                    end = start
                    arrival[action] = start + p2p_latency
                else:
                    took = duration(action)
                    end = start + took
                    busy[rank] += took if action.op in COMPUTE_OPS else 0.0
                timeline[rank].append(ActionTiming(action, start, end))
                clock[rank] = end
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ScheduleDeadlock(_describe_deadlock(actions_per_rank, position, pp))
    return SimResult(max(clock), ideal_of(busy), busy, timeline)


def check_fifo(actions_per_rank: list[list[Action]], pp: int) -> None:
    """NCCL matches point-to-point messages per directed rank pair in posting order: the
    SENDs from a to b must be posted in the order b posts their RECVs."""
    posted: dict[tuple[int, int, str], list[Action]] = {}
    for rank, actions in enumerate(actions_per_rank):
        for action in actions:
            if action.op in SEND_OPS:
                peer = stage_owner(_peer_stage(action), pp)
                posted.setdefault((rank, peer, "send"), []).append(matching_recv(action))
            elif action.op in RECV_OPS:
                peer = stage_owner(_peer_stage(action), pp)
                posted.setdefault((peer, rank, "recv"), []).append(action)
    for (src, dst, kind), recvs in posted.items():
        if kind != "send":
            continue
        expected = posted.get((src, dst, "recv"), [])
        if recvs != expected:
            first = next(i for i, (a, b) in enumerate(zip(recvs, expected)) if a != b)
            raise ScheduleError(
                f"messages from rank {src} to rank {dst} are posted in another order than they "
                f"are received (message {first}: rank {src} sends for {recvs[first]}, rank "
                f"{dst} receives {expected[first]} first); NCCL would deliver the wrong tensor")


def _simulate_rendezvous(actions_per_rank: list[list[Action]], pp: int,
                         duration: Callable[[Action], float], p2p_latency: float
                         ) -> tuple[list[float], list[float], list[list[ActionTiming]]]:
    steps = [comm_batches(actions) for actions in actions_per_rank]
    clock = [0.0] * pp
    position = [0] * pp
    busy = [0.0] * pp
    timeline: list[list[ActionTiming]] = [[] for _ in range(pp)]
    posted_at: dict[Action, float] = {}  # operations of the batch each rank waits in
    while any(position[r] < len(steps[r]) for r in range(pp)):
        progressed = False
        for rank in range(pp):
            while position[rank] < len(steps[rank]):
                step = steps[rank][position[rank]]
                start = clock[rank]
                # an R right after a batch runs between posting it and waiting for it
                overlap = (steps[rank][position[rank] + 1][0]
                           if position[rank] + 1 < len(steps[rank]) else None)
                overlap = overlap if step[0].op in COMM_OPS and overlap is not None and (
                    overlap.op is Op.R) else None
                if step[0].op not in COMM_OPS:
                    end = start + duration(step[0])
                    busy[rank] += duration(step[0]) if step[0].op in COMPUTE_OPS else 0.0
                    timeline[rank].append(ActionTiming(step[0], start, end))
                else:
                    for action in step:
                        posted_at.setdefault(action, start)
                    partners = [matching_recv(a) if a.op in SEND_OPS else matching_send(a)
                                for a in step]
                    if any(partner not in posted_at for partner in partners):
                        break
                    end = max(start, *(posted_at[p] for p in partners)) + p2p_latency
                    if overlap is not None:
                        end = max(end, start + duration(overlap))
                    timeline[rank].extend(ActionTiming(a, start, end) for a in step)
                    if overlap is not None:
                        timeline[rank].append(
                            ActionTiming(overlap, start, start + duration(overlap)))
                        position[rank] += 1
                clock[rank] = end
                position[rank] += 1
                progressed = True
        if not progressed:
            waiting = [f"rank {r} waits in batch [{' '.join(map(str, steps[r][position[r]]))}]"
                       for r in range(pp) if position[r] < len(steps[r])]
            raise ScheduleDeadlock("schedule deadlocks under rendezvous point-to-point: "
                                   + "; ".join(waiting))
    return clock, busy, timeline


def _describe_deadlock(
    actions_per_rank: list[list[Action]], position: list[int], pp: int
) -> str:
    blocked = []
    for rank, actions in enumerate(actions_per_rank):
        if position[rank] < len(actions):
            waiting = actions[position[rank]]
            send = matching_send(waiting)
            blocked.append(
                f"rank {rank} blocked at {waiting} (position {position[rank]}) waiting for "
                f"{send} on rank {stage_owner(send.stage, pp)}"
            )
    return "schedule deadlocks: " + "; ".join(blocked)


def format_timeline(result: SimResult, time_unit: float = 1.0, cell_width: int = 3) -> str:
    """ASCII Gantt chart of the compute actions: one row per rank, `cell_width` chars per unit.

    Each F/B is drawn as its name (stage.microbatch, e.g. `F2.1`) padded with `-` over its
    duration, DEP's encoder recompute as `R`; `.` marks idle time (the bubble). Times are
    rounded to whole cells.
    """
    rows = []
    total_cells = round(result.makespan / time_unit) * cell_width
    for rank, timings in enumerate(result.timeline_per_rank):
        row = ["."] * total_cells
        for timing in timings:
            if timing.action.op in COMM_OPS:
                continue
            first = round(timing.start / time_unit) * cell_width
            last = round(timing.end / time_unit) * cell_width
            action = timing.action
            label = "+".join(f"{p.op.value}{p.stage}.{p.microbatch}" for p in action.parts
                             ) if action.op is not Op.R else "R"
            text = (label + "-" * (last - first))[: last - first - 1] + " "
            row[first:last] = list(text)
        rows.append(f"rank {rank}: " + "".join(row).rstrip())
    return "\n".join(rows)
