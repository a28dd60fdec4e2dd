"""The pipeline schedule as data: for each pipeline rank, the ordered list of actions it runs.

The LM is cut into pp * vpp chunks ("stages", global index s = 0 .. pp*vpp-1, in layer order).
Rank r holds stages r, r+pp, r+2*pp, ... (Megatron interleaving): local chunk c of rank r is
global stage c*pp + r, so stage s lives on rank s % pp and hands its output to rank (s+1) % pp,
a ring when vpp > 1 (rank pp-1 feeds rank 0 for the next chunk).

Keeping the schedule as plain data lets it be printed, checked for deadlock and simulated for
its bubble (parallel/schedule_sim.py) without running a model; the runtime
(parallel/pipeline_runtime.py) only walks the list.

Interleaved 1F1B, pp=2 vpp=2 m=4 (stages 0,2 on rank 0; 1,3 on rank 1). Compute order,
`format_schedule(interleaved_1f1b(2, 2, 4))`, cut in two:

    rank 0: F0.m0 F0.m1 F2.m0 F2.m1 F0.m2 B2.m0 F0.m3 B2.m1
            '------ warm-up ------' '-- 1F1B ...
    rank 1: F1.m0 F1.m1 F3.m0 B3.m0 F3.m1 B3.m1 F1.m2 B1.m0
            ' warm-up ' '-- 1F1B ...
    rank 0: F2.m2 B0.m0 F2.m3 B0.m1 B2.m2 B2.m3 B0.m2 B0.m3
                        ... 1F1B -' '----- cool-down -----'
    rank 1: F1.m3 B1.m1 F3.m2 B3.m2 F3.m3 B3.m3 B1.m2 B1.m3
                                    ... 1F1B -' ' cool-down '

    warm-up forwards of rank r = 2*(pp-r-1) + (vpp-1)*pp   (plain 1F1B: pp-r-1)

On a time axis (F = B = 1 unit, 5 chars per unit, `.` idle; `format_timeline(simulate(...))`
from schedule_sim.py; `F2.1` = forward of stage 2 on microbatch 1):

  rank 0: F0.0 F0.1 F2.0 F2.1 F0.2 B2.0 F0.3 B2.1 F2.2 B0.0 F2.3 B0.1 .....B2.2 .....B2.3 B0.2 B0.3
  rank 1: .....F1.0 F1.1 F3.0 B3.0 F3.1 B3.1 F1.2 B1.0 F1.3 B1.1 F3.2 B3.2 F3.3 B3.3 B1.2 B1.3 .....

makespan 18 = 16 units of work + (pp-1)*(F+B) = 2 units of bubble: bubble fraction
(pp-1) / (vpp*m) = 1/8. Without interleaving (one chunk per rank, each F/B vpp times longer)
the same model idles (pp-1)*vpp*(F+B) = 4 units.

Forwards walk the chunks in groups of pp microbatches (forward k runs chunk (k // pp) % vpp on
microbatch (k // (pp*vpp)) * pp + k % pp); backwards walk the chunks in reverse order.

Communication: `with_communication` follows Megatron-Core's batched point-to-point: after each
loop iteration (warm-up F, steady F+B, cool-down B) the sends of its outputs and the receives
of the next iteration's inputs, posted together as one batch, which NCCL's rendezvous sends
need (see its docstring). When producer and consumer stage sit on the SAME rank (only when
pp == 1) no SEND/RECV is emitted at all: the runtime hands the tensor over locally, and the
checker instead requires the producing F/B earlier on that rank.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Callable


class Op(enum.Enum):
    """What an action does: F/B run a chunk, SEND_*/RECV_* move its tensors between ranks,
    FB runs the forward of one chunk-microbatch and the backward of another together, node
    by node, so each one's expert all-to-alls overlap the other's compute. R (DEP only, one
    per rank, written `R<rank>.m0`) recomputes the vision encoder's forward, with grad, over
    the media items this rank encodes, placed in one of the rank's idle slots
    (parallel/dep_bubbles.py); it belongs to no chunk and touches no pipeline tensor."""

    F = "F"
    B = "B"
    FB = "FB"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"
    R = "R"


COMPUTE_OPS = (Op.F, Op.B, Op.FB)
SEND_OPS = (Op.SEND_F, Op.SEND_B)
RECV_OPS = (Op.RECV_F, Op.RECV_B)
COMM_OPS = SEND_OPS + RECV_OPS

# Longer names first in the alternation so "SEND_F3.m0" never matches as op "F".
_ACTION_PATTERN = re.compile(
    r"^(?P<op>SEND_F|RECV_F|SEND_B|RECV_B|F|B|R)(?P<stage>\d+)\.m(?P<microbatch>\d+)$"
)
_PAIR_PATTERN = re.compile(
    r"^F(?P<stage>\d+)\.m(?P<microbatch>\d+)\+B(?P<b_stage>\d+)\.m(?P<b_microbatch>\d+)$")
_RANK_LINE_PATTERN = re.compile(r"^rank\s+(?P<rank>\d+):(?P<actions>.*)$")


@dataclass(frozen=True)
class Action:
    """One step of one rank's schedule: `op` on global stage `stage` for microbatch `microbatch`.

    An FB action is the forward of (stage, microbatch) and the backward of (b_stage,
    b_microbatch). The string form (`F3.m5`, `RECV_F2.m0`, `F3.m5+B2.m1`) is what printed
    schedules and tests are written in, so it parses back with `Action.parse`.
    """

    op: Op
    stage: int
    microbatch: int
    b_stage: int | None = None
    b_microbatch: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.op, Op):
            raise TypeError(f"Action.op must be an Op, got {self.op!r}")
        if self.stage < 0 or self.microbatch < 0:
            raise ValueError(
                f"Action stage and microbatch must be >= 0, got stage={self.stage}, "
                f"microbatch={self.microbatch}"
            )
        if (self.op is Op.FB) != (self.b_stage is not None and self.b_microbatch is not None):
            raise ValueError("an FB action, and only an FB action, names a backward part "
                             "(b_stage, b_microbatch)")

    @property
    def parts(self) -> tuple["Action", ...]:
        """The F and the B an FB runs (in that order), or the action itself."""
        if self.op is not Op.FB:
            return (self,)
        return (Action(Op.F, self.stage, self.microbatch),
                Action(Op.B, self.b_stage, self.b_microbatch))

    def __str__(self) -> str:
        if self.op is Op.FB:
            return f"F{self.stage}.m{self.microbatch}+B{self.b_stage}.m{self.b_microbatch}"
        return f"{self.op.value}{self.stage}.m{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        pair = _PAIR_PATTERN.match(text.strip())
        if pair is not None:
            return cls(Op.FB, int(pair["stage"]), int(pair["microbatch"]), int(pair["b_stage"]),
                       int(pair["b_microbatch"]))
        match = _ACTION_PATTERN.match(text.strip())
        if match is None:
            raise ValueError(
                f"cannot parse action {text!r}: write <OP><stage>.m<microbatch> with OP one of "
                f"{', '.join(op.value for op in Op if op is not Op.FB)}, e.g. 'F3.m5' or "
                "'RECV_F2.m0', or a pair 'F3.m5+B2.m1'"
            )
        return cls(Op(match["op"]), int(match["stage"]), int(match["microbatch"]))


def stage_owner(stage: int, pp: int) -> int:
    """Pipeline rank that holds global stage `stage`."""
    return stage % pp


def local_chunk(stage: int, pp: int) -> int:
    """Index of global stage `stage` among its rank's chunks (the runtime's model-chunk list)."""
    return stage // pp


def validate_schedule_shape(pp: int, vpp: int, microbatches: int) -> None:
    """Refuse (pp, vpp, microbatches) that interleaved 1F1B cannot serve.

    Interleaving moves microbatches through the chunks in groups of pp, so with vpp > 1 a
    partial group (microbatches not a multiple of pp, or fewer than pp) has no place in it.
    """
    for name, value in (("pp", pp), ("vpp", vpp), ("microbatches", microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if vpp > 1 and microbatches < pp:
        raise ValueError(
            f"interleaved 1F1B (vpp={vpp}) needs microbatches >= pp, got microbatches="
            f"{microbatches} < pp={pp}: use at least {pp} microbatches, or vpp=1"
        )
    if vpp > 1 and microbatches % pp != 0:
        raise ValueError(
            f"interleaved 1F1B (vpp={vpp}) needs microbatches to be a multiple of pp={pp}, got "
            f"microbatches={microbatches}: use a multiple of {pp} "
            f"(e.g. {(microbatches // pp + 1) * pp}), or vpp=1"
        )


def warmup_forwards(pp: int, vpp: int, microbatches: int, rank: int,
                    ep_overlap: bool = False) -> int:
    """Forwards `rank` runs before its first backward.

    (vpp-1)*pp fills the other chunks so the first backward (last chunk) has its input; the
    pipeline-depth term is pp-rank-1 for plain 1F1B (the fewest in-flight activations). For
    vpp > 1 Megatron doubles it: with zero-latency p2p both give the same, theoretical bubble
    (the simulator shows it), but the extra pp-rank-1 forwards keep a rank computing while a
    message is in flight (simulate(..., p2p_latency=1) on pp=16 vpp=2 m=32: makespan 299 vs
    387 units), for pp-rank-1 more microbatches of stored activations.

    With `ep_overlap` (interleaved, or pp = 1) one more warm-up forward, as Megatron-Core
    does for its combined 1F1B: otherwise the last stage would pair the forward and the
    backward of the same microbatch, which cannot run together.
    """
    depth_term = pp - rank - 1
    if vpp > 1:
        depth_term *= 2
    extra = int(ep_overlap and (vpp > 1 or pp == 1))
    return min(microbatches * vpp, depth_term + (vpp - 1) * pp + extra)


def interleaved_1f1b(pp: int, vpp: int, microbatches: int,
                     ep_overlap: bool = False) -> list[list[Action]]:
    """Per pipeline rank, the ordered F/B actions of Megatron-Core's interleaved 1F1B.

    vpp == 1 yields plain 1F1B. Counting each rank's forwards and backwards k = 0, 1, ...:

        forward k  -> chunk (k // pp) % vpp,          microbatch (k // (pp*vpp)) * pp + k % pp
        backward k -> chunk vpp - 1 - (k // pp) % vpp, same microbatch formula
        order      -> warm-up forwards, (forward, backward) pairs, cool-down backwards
    """
    validate_schedule_shape(pp, vpp, microbatches)
    total = microbatches * vpp

    def compute_action(op: Op, rank: int, k: int) -> Action:
        chunk = (k // pp) % vpp
        if op is Op.B:
            chunk = vpp - 1 - chunk
        microbatch = (k // (pp * vpp)) * pp + k % pp
        return Action(op, chunk * pp + rank, microbatch)

    per_rank = []
    for rank in range(pp):
        warmup = warmup_forwards(pp, vpp, microbatches, rank, ep_overlap)
        actions = [compute_action(Op.F, rank, k) for k in range(warmup)]
        for k in range(total - warmup):
            actions.append(compute_action(Op.F, rank, warmup + k))
            actions.append(compute_action(Op.B, rank, k))
        actions.extend(compute_action(Op.B, rank, k) for k in range(total - warmup, total))
        per_rank.append(actions)
    return per_rank


def _iterations(actions: list[Action], pp: int, vpp: int, rank: int) -> list[list[Action]]:
    """A rank's compute order as Megatron's interleaved loop iterations: warm-up F, steady
    (F, B) pairs, cool-down B. Plain 1F1B (vpp = 1) and lists of another shape (hand-written)
    are one action per iteration: Megatron's 1F1B posts send_forward_recv_backward between
    the F and the B of a steady-state step, which lets the backward's input arrive while
    nothing else is pending (waiting for it before the F would double the bubble)."""
    forwards = sum(a.op is Op.F for a in actions)
    singles = [[a] for a in actions]
    if vpp == 1 or forwards % vpp or not forwards:
        return singles
    microbatches = forwards // vpp
    for ep_overlap in (False, True):
        try:
            warmup = warmup_forwards(pp, vpp, microbatches, rank, ep_overlap)
        except ValueError:
            return singles
        steady = forwards - warmup
        shape = [Op.F] * warmup + [Op.F, Op.B] * steady + [Op.B] * warmup
        if [a.op for a in actions] == shape:
            pairs = [actions[warmup + 2 * k: warmup + 2 * k + 2] for k in range(steady)]
            return singles[:warmup] + pairs + singles[warmup + 2 * steady:]
    return singles


def with_communication(
    compute_actions_per_rank: list[list[Action]], pp: int, vpp: int
) -> list[list[Action]]:
    """Add the SEND/RECV of every F/B whose neighbour stage lives on another rank.

    Placement (Megatron-Core's loops, batch_p2p_comm): after each iteration (plain 1F1B:
    each F or B; interleaved: a warm-up F, a steady-state F+B pair, a cool-down B) ONE group
    of communication: the SENDs of what the iteration produced, then the RECVs of what the
    next iteration consumes. The first iteration's RECVs come first. Consecutive SEND/RECV
    actions are posted as one batch (`comm_batches`), so neighbours always post facing
    sends together with the receives that complete them: no head-on send blocks under
    NCCL's rendezvous semantics (`simulate(..., rendezvous=True)` proves it per shape).

        rank 0:  F0.m0 [SEND_F0.m0] F0.m1 [SEND_F0.m1 RECV_B0.m0] B0.m0 ...
        rank 1:  [RECV_F1.m0] F1.m0 B1.m0 [SEND_B1.m0 RECV_F1.m1] F1.m1 ...

    Nothing is emitted between stages of the same rank (pp == 1: handed over locally).
    """
    if len(compute_actions_per_rank) != pp:
        raise ValueError(
            f"expected one action list per pipeline rank (pp={pp}), "
            f"got {len(compute_actions_per_rank)}"
        )
    last_stage = pp * vpp - 1

    def remote(rank: int, stage: int) -> bool:
        return 0 <= stage <= last_stage and stage_owner(stage, pp) != rank

    def receives(rank: int, iteration: list[Action]) -> list[Action]:
        out = []
        for a in iteration:
            if a.op is Op.F and remote(rank, a.stage - 1):
                out.append(Action(Op.RECV_F, a.stage, a.microbatch))
            elif a.op is Op.B and remote(rank, a.stage + 1):
                out.append(Action(Op.RECV_B, a.stage, a.microbatch))
        return out

    def sends(rank: int, iteration: list[Action]) -> list[Action]:
        out = []
        for a in iteration:
            if a.op is Op.F and remote(rank, a.stage + 1):
                out.append(Action(Op.SEND_F, a.stage, a.microbatch))
            elif a.op is Op.B and remote(rank, a.stage - 1):
                out.append(Action(Op.SEND_B, a.stage, a.microbatch))
        return out

    per_rank = []
    for rank, actions in enumerate(compute_actions_per_rank):
        for action in actions:
            if action.op not in (Op.F, Op.B):
                raise ValueError(
                    f"with_communication takes compute actions (F/B) only, got {action} "
                    f"on rank {rank}"
                )
            if action.stage > last_stage:
                raise ValueError(
                    f"{action} on rank {rank}: stage {action.stage} does not exist with "
                    f"pp={pp} vpp={vpp}"
                )
        iterations = _iterations(actions, pp, vpp, rank)
        out: list[Action] = receives(rank, iterations[0]) if iterations else []
        for index, iteration in enumerate(iterations):
            out.extend(iteration)
            out.extend(sends(rank, iteration))
            if index + 1 < len(iterations):
                out.extend(receives(rank, iterations[index + 1]))
        per_rank.append(out)
    return per_rank


def comm_batches(actions: list[Action]) -> list[list[Action]]:
    """A rank's schedule as steps: each compute action (and R) alone, each maximal run of
    consecutive SEND/RECV actions as one batch (what the runtime posts with one
    batch_isend_irecv)."""
    steps: list[list[Action]] = []
    for action in actions:
        if action.op not in COMM_OPS or not steps or steps[-1][0].op not in COMM_OPS:
            steps.append([action])
        else:
            steps[-1].append(action)
    return steps


def combine_forward_backward(actions_per_rank: list[list[Action]]) -> list[list[Action]]:
    """Merge each forward directly followed by a backward, or a backward directly followed by
    a forward, into one FB action when neither needs the other (another microbatch): the
    steady state of interleaved 1F1B (and of pp = 1) with `ep_overlap`. The runtime then runs
    the two node by node, each one's all-to-alls under the other's compute."""
    out = []
    for actions in actions_per_rank:
        merged: list[Action] = []
        index = 0
        while index < len(actions):
            pair = actions[index:index + 2]
            ops = [a.op for a in pair]
            if ops in ([Op.F, Op.B], [Op.B, Op.F]) and pair[0].microbatch != pair[1].microbatch:
                forward, backward = pair if ops[0] is Op.F else pair[::-1]
                merged.append(Action(Op.FB, forward.stage, forward.microbatch, backward.stage,
                                     backward.microbatch))
                index += 2
            else:
                merged.append(actions[index])
                index += 1
        out.append(merged)
    return out


def schedule(pp: int, vpp: int, microbatches: int, ep_overlap: bool = False
             ) -> list[list[Action]]:
    """The full per-rank action lists (compute and communication) of interleaved 1F1B.

    `ep_overlap`: steady-state forward/backward pairs become FB actions (interleaved 1F1B,
    or pp = 1; plain 1F1B with pp > 1 receives each backward's input between its F and its B,
    so nothing pairs there and the schedule is unchanged).
    """
    actions = with_communication(interleaved_1f1b(pp, vpp, microbatches, ep_overlap), pp, vpp)
    return combine_forward_backward(actions) if ep_overlap else actions


def peak_in_flight(actions: list[Action], held: Callable[[int, int], float]
                   ) -> tuple[float, dict[int, int]]:
    """One rank's largest stored activation under its action list: the maximum over time of
    `held(stage, microbatch)` summed over the forwards whose backward has not run yet (a
    forward's saved tensors live until its backward frees them), and the microbatches of
    each stage in flight at that moment. For interleaved 1F1B with equal chunks that is
    `warmup_forwards + 1` forwards."""
    live: dict[int, int] = {}
    total, peak, at_peak = 0.0, 0.0, {}
    for action in actions:
        if action.op is Op.F:
            live[action.stage] = live.get(action.stage, 0) + 1
            total += held(action.stage, action.microbatch)
            if total > peak:
                peak, at_peak = total, {s: n for s, n in live.items() if n}
        elif action.op is Op.B:
            live[action.stage] -= 1
            total -= held(action.stage, action.microbatch)
    return peak, dict(sorted(at_peak.items()))


def format_schedule(actions_per_rank: list[list[Action]]) -> str:
    """One `rank r: ...` line per rank.

    Compute actions are padded to one width and communication actions to another, so compute-
    only schedules line up in columns and the SEND/RECV around an F/B stay easy to spot.
    """
    widths: dict[bool, int] = {True: 0, False: 0}
    for actions in actions_per_rank:
        for action in actions:
            is_compute = action.op in COMPUTE_OPS
            widths[is_compute] = max(widths[is_compute], len(str(action)))
    label_width = len(f"rank {len(actions_per_rank) - 1}:")
    lines = []
    for rank, actions in enumerate(actions_per_rank):
        cells = [str(action).ljust(widths[action.op in COMPUTE_OPS]) for action in actions]
        lines.append(" ".join([f"rank {rank}:".ljust(label_width), *cells]).rstrip())
    return "\n".join(lines)


def parse_schedule(text: str) -> list[list[Action]]:
    """Inverse of `format_schedule`: lets tests and notes write schedules as text."""
    per_rank: list[list[Action]] = []
    for line_number, line in enumerate(text.strip().splitlines(), start=1):
        match = _RANK_LINE_PATTERN.match(line.strip())
        if match is None or int(match["rank"]) != len(per_rank):
            raise ValueError(
                f"line {line_number} {line!r}: expected 'rank {len(per_rank)}: <actions...>' "
                f"(ranks in order from 0)"
            )
        per_rank.append([Action.parse(token) for token in match["actions"].split()])
    return per_rank
