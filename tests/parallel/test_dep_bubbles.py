"""DEP's encoder recompute inside the pipeline's bubbles (parallel/dep_bubbles.py), its
simulation (parallel/schedule_sim.py) and how the runtime runs it
(parallel/pipeline_runtime.py). Pure Python and a fake point-to-point layer: no process
groups. That the numbers do not change is proven by the DEP equivalence tests
(tests/distributed) and the golden DEP run (tests/golden), which run this schedule."""
from __future__ import annotations

import types

import pytest
import torch

from parallel import pipeline_runtime
from parallel.dep_bubbles import makespans, recompute_action, with_encoder_recompute
from parallel.pipeline_runtime import PipelineRuntime
from parallel.schedule import COMM_OPS, RECV_OPS, Action, Op, parse_schedule, schedule
from parallel.schedule_sim import ScheduleError, format_timeline, simulate

SHAPES = [(pp, vpp, m, overlap) for pp, vpp, m in
          [(2, 1, 4), (2, 1, 8), (2, 2, 4), (4, 1, 8), (4, 2, 8), (4, 2, 16), (8, 2, 16)]
          for overlap in (False, True)]


def test_two_ranks_hide_the_recompute_in_the_cool_down():
    after, inside, sim = makespans(schedule(2, 1, 4), 2, 1)
    assert (after, inside) == (16.0, 15.0)  # the schedule alone takes 15
    assert format_timeline(sim).splitlines() == [
        "rank 0: F0 F0 ......B0.0- F0 B0.1- F0 B0.2- R- B0.3-",
        "rank 1: ...F1 B1.0- F1 B1.1- F1 B1.2- F1 B1.3- R- ..."]


@pytest.mark.parametrize("pp,vpp,m,overlap", SHAPES)
def test_one_recompute_per_rank_in_its_cool_down_and_hidden(pp, vpp, m, overlap):
    plain = schedule(pp, vpp, m, overlap)
    placed = with_encoder_recompute(plain, pp, vpp)
    for rank, (before, actions) in enumerate(zip(plain, placed)):
        assert [a for a in actions if a.op is not Op.R] == before
        at = actions.index(recompute_action(rank))
        assert sum(a.op is Op.R for a in actions) == 1
        assert not any(p.op is Op.F for a in actions[at:] for p in a.parts)  # cool-down
        # right after a batch that receives (it fills that wait), or at the end
        if at < len(actions) - 1:
            assert actions[at - 1].op in RECV_OPS
    pipeline = simulate(plain, pp, vpp, 1.0, 2.0, rendezvous=True).makespan
    after, inside, _ = makespans(plain, pp, vpp)
    assert after == pipeline + 1
    assert inside == pipeline  # R = one forward fits every rank's cool-down wait here


@pytest.mark.parametrize("pp,vpp,m", [(2, 1, 4), (4, 2, 8), (8, 2, 16)])
def test_a_recompute_longer_than_the_bubble_is_never_later_than_after(pp, vpp, m):
    for cost in (2.0, 4.0, 8.0):
        after, inside, _ = makespans(schedule(pp, vpp, m), pp, vpp, recompute_cost=cost)
        assert inside <= after


def test_recompute_before_the_receiving_batch_would_not_be_hidden():
    # the mutant placement: R between a batch's sends and its receives (the batch split)
    # makes the sends wait for the peer under rendezvous, so nothing is gained
    plain = schedule(2, 2, 4)
    placed = with_encoder_recompute(plain, 2, 2)
    mutant = []
    for rank, actions in enumerate(placed):
        at = actions.index(recompute_action(rank))
        rest = [a for a in actions if a.op is not Op.R]
        first_recv = at - 1
        while first_recv > 0 and rest[first_recv - 1].op in RECV_OPS:
            first_recv -= 1
        mutant.append(rest[:first_recv] + [recompute_action(rank)] + rest[first_recv:])
    pipeline = simulate(plain, 2, 2, 1.0, 2.0, rendezvous=True).makespan
    assert simulate(placed, 2, 2, 1.0, 2.0, rendezvous=True).makespan == pipeline
    assert simulate(mutant, 2, 2, 1.0, 2.0, rendezvous=True).makespan > pipeline


def test_recompute_actions_are_checked_and_simulated_only_with_rendezvous():
    placed = with_encoder_recompute(schedule(2, 1, 2), 2, 1)
    assert parse_schedule("rank 0: R0.m0 F0.m0")[0][0] == recompute_action(0)
    with pytest.raises(ValueError, match="rendezvous=True"):
        simulate(placed, 2, 1)
    twice = [placed[0] + [Action(Op.R, 2, 0)], placed[1]]  # stage 2 would sit on rank 0
    with pytest.raises(ScheduleError, match="more than one R"):
        simulate(twice, 2, 1, rendezvous=True)
    with pytest.raises(ValueError, match="already holds R"):
        with_encoder_recompute(placed, 2, 1)


def test_single_rank_recomputes_after_its_last_backward():
    placed = with_encoder_recompute(schedule(1, 1, 3), 1, 1)
    assert placed[0][-1] == recompute_action(0)


class FakeP2P:
    """Stands in for torch.distributed's batched point-to-point: records when each batch is
    posted and waited for; received buffers are filled with ones."""

    def __init__(self, events: list[str]):
        self.events = events
        self.isend, self.irecv = "isend", "irecv"

    def P2POp(self, op, tensor, peer, tag):  # noqa: N802 (torch's name)
        return types.SimpleNamespace(op=op, tensor=tensor)

    def batch_isend_irecv(self, ops):
        name = " ".join(o.op for o in ops)
        self.events.append(f"post {name}")
        for o in ops:
            if o.op == "irecv":
                o.tensor.fill_(1.0)
        return [types.SimpleNamespace(wait=lambda: self.events.append(f"wait {name}"))]


def test_runtime_recomputes_while_the_receiving_batch_is_in_flight(monkeypatch):
    # rank 0 of pp=2, m=4: R sits right after the batch that receives B0.m3's gradient
    events: list[str] = []
    monkeypatch.setattr(pipeline_runtime, "dist", FakeP2P(events))
    actions = with_encoder_recompute(schedule(2, 1, 4), 2, 1)[0]
    at = actions.index(recompute_action(0))
    assert [str(a) for a in actions[at - 1:at + 2]] == ["RECV_B0.m3", "R0.m0", "B0.m3"]
    weight = torch.ones(2, requires_grad=True)
    runtime = PipelineRuntime(actions, num_stages=2, microbatches=4, stage_rank=lambda s: s,
                              activation_shape=(2,))

    def forward(stage, x, mb):
        events.append(f"F{stage}.m{mb}")
        return weight * (mb + 1)

    runtime.run(forward, lambda out, mb: out.sum(), recompute=lambda: events.append("R"))
    r = events.index("R")
    assert events[r - 1] == "post irecv" and events[r + 1] == "wait irecv"
    assert weight.grad is not None
    with pytest.raises(ValueError, match="no `recompute`"):
        runtime.run(forward, lambda out, mb: out.sum())
    assert [str(t.action) for t in runtime.timeline if t.action.op not in COMM_OPS][-2:] == [
        "R0.m0", "B0.m3"]
