"""Where DEP's encoder recompute runs: in an idle slot of each rank's pipeline schedule.

DEP (parallel/dep.py) does three pieces of encoder work per step besides the pipeline:
a no-grad forward before it, and a recompute (forward with grad) and a backward after it.
The recompute needs only this rank's pixels and the encoder weights, both there once the
DEP forward ran, so it can run anywhere inside the schedule. Each rank gets one action R
at a point where the simulator (parallel/schedule_sim.py) says it would wait anyway:

    pp=2, m=4 (F=1, B=2, R=1; `format_timeline`, 3 characters a unit):
    before   rank 0: F0 F0 ......B0.0- F0 B0.1- F0 B0.2- ...B0.3-  then R on every rank
             rank 1: ...F1 B1.0- F1 B1.1- F1 B1.2- F1 B1.3- ......
    now      rank 0: F0 F0 ......B0.0- F0 B0.1- F0 B0.2- R  B0.3-  makespan 15, not 16
             rank 1: ...F1 B1.0- F1 B1.1- F1 B1.2- F1 B1.3- R  ...

Candidates are the rank's waits in the cool-down (after its last forward), and the end of
its list: from there on the encoder's saved activations live only until the encoder
backward at the end of the step, while the pipeline already frees its own (R in the
warm-up bubble would hold them through the steady state, the pipeline's memory peak).
R goes right after a communication batch that receives: the runtime posts the batch, runs
R, then waits for the batch, so R fills the wait and delays no send. It takes the LATEST
candidate after which the rank still idles at least `recompute_cost` in the simulation
without R (least time holding the activations), else the end of the list (there it still
overlaps the other ranks' last backwards, before the gradients travel back). If the
simulated step with these places is longer than the schedule plus one R (the recompute
after the schedule, as before), R goes at the ends. Cost: two simulations of the whole
schedule on every rank at start (about 1-2 s each at pp=16, vpp=2, 64 microbatches on this
machine's CPU; linear in pp x vpp x microbatches). `makespans` shows the result; only the encoder backward (after the gradients come
back from stage 0's last backward) stays after the schedule.

Numerics do not change: the same forward on the same inputs and weights, only earlier; the
backward still runs once over all of the rank's items. Known limits: placement uses one
cost for every F, B and R (the engine: F=1, B=2, R=1); an R much longer than the rank's
idle is placed where it delays the step least but is not hidden. The no-grad forward stays
before the schedule: stage 0 needs its embeddings for its first forward and, with the
plan fixed, encodes its own share first; moving that share to the ranks idle in the
warm-up would change the plan (which rank encodes what) and so the encoder gradients'
summation order.
"""
from __future__ import annotations

from parallel.schedule import COMM_OPS, COMPUTE_OPS, RECV_OPS, Action, Op
from parallel.schedule_sim import SimResult, simulate


def recompute_action(rank: int) -> Action:
    return Action(Op.R, rank, 0)


def with_encoder_recompute(actions_per_rank: list[list[Action]], pp: int, vpp: int, *,
                           forward_cost: float = 1.0, backward_cost: float = 2.0,
                           recompute_cost: float = 1.0) -> list[list[Action]]:
    """Each rank's list with one R inserted (module docstring); the lists must not hold R."""
    if any(a.op is Op.R for actions in actions_per_rank for a in actions):
        raise ValueError("the schedule already holds R actions")
    costs = dict(forward_cost=forward_cost, backward_cost=backward_cost)
    sim = simulate(actions_per_rank, pp, vpp, **costs, rendezvous=True)
    at_end = [actions + [recompute_action(rank)] for rank, actions in enumerate(actions_per_rank)]
    placed = []
    for rank, (actions, timings) in enumerate(zip(actions_per_rank, sim.timeline_per_rank)):
        # timings: one per action, in list order (a batch's actions share its times)
        compute_after = [0.0] * (len(actions) + 1)
        for i in range(len(actions) - 1, -1, -1):
            took = timings[i].end - timings[i].start if actions[i].op in COMPUTE_OPS else 0.0
            compute_after[i] = compute_after[i + 1] + took
        last_forward = max((i for i, a in enumerate(actions)
                            if any(p.op is Op.F for p in a.parts)), default=-1)
        # R after a batch that receives: it runs while that batch is in flight
        batch_ends = [i for i in range(last_forward + 1, len(actions))
                      if actions[i].op in COMM_OPS and (i + 1 == len(actions) or actions[
                          i + 1].op not in COMM_OPS)]
        idle = {}
        for i in batch_ends:
            first = i
            while first > 0 and actions[first - 1].op in COMM_OPS:
                first -= 1
            if any(a.op in RECV_OPS for a in actions[first:i + 1]):
                idle[i + 1] = sim.makespan - timings[first].start - compute_after[first]
        idle[len(actions)] = sim.makespan - (timings[-1].end if timings else 0.0)
        enough = [i for i in idle if idle[i] >= recompute_cost]
        at = max(enough) if enough else len(actions)
        placed.append(actions[:at] + [recompute_action(rank)] + actions[at:])
    # the simulator has the last word: never later than the recompute after the schedule
    # (R appended to every list ends by then too: nothing waits for it)
    inside = simulate(placed, pp, vpp, **costs, rendezvous=True, recompute_cost=recompute_cost)
    return placed if inside.makespan <= sim.makespan + recompute_cost else at_end


def makespans(actions_per_rank: list[list[Action]], pp: int, vpp: int, *,
              forward_cost: float = 1.0, backward_cost: float = 2.0,
              recompute_cost: float = 1.0) -> tuple[float, float, SimResult]:
    """The simulated step up to the encoder backward (which runs after the schedule either
    way): (recompute after the schedule, recompute in the bubbles, the latter's timeline).
    After the schedule means after the gradients came back, on every rank at once:
    the schedule's makespan + recompute_cost."""
    plain = simulate(actions_per_rank, pp, vpp, forward_cost, backward_cost, rendezvous=True)
    inside = simulate(with_encoder_recompute(actions_per_rank, pp, vpp,
                                             forward_cost=forward_cost,
                                             backward_cost=backward_cost,
                                             recompute_cost=recompute_cost),
                      pp, vpp, forward_cost, backward_cost, rendezvous=True,
                      recompute_cost=recompute_cost)
    return plain.makespan + recompute_cost, inside.makespan, inside
