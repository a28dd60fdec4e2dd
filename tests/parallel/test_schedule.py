"""Tests of the pipeline schedule generator (parallel/schedule.py) and its simulator
(parallel/schedule_sim.py). Pure Python, no process groups."""

from __future__ import annotations

import types
from collections import Counter

import pytest

from parallel.schedule import (
    Action,
    Op,
    comm_batches,
    format_schedule,
    interleaved_1f1b,
    local_chunk,
    parse_schedule,
    schedule,
    stage_owner,
    with_communication,
)
from parallel.schedule_sim import (
    ScheduleDeadlock,
    ScheduleError,
    check_fifo,
    format_timeline,
    simulate,
)

# (forward_cost, backward_cost): equal costs, and the usual backward = 2 x forward.
COSTS = [(1.0, 1.0), (1.0, 2.0)]


def assert_complete_on_owners(actions_per_rank, pp, vpp, microbatches):
    """Independent of the checker: every (stage, mb) has one F and one B, on the owning rank."""
    seen = Counter()
    for rank, actions in enumerate(actions_per_rank):
        for action in actions:
            if action.op in (Op.F, Op.B):
                assert action.stage % pp == rank, f"{action} on rank {rank}"
                seen[(action.op, action.stage, action.microbatch)] += 1
    expected = {
        (op, stage, mb): 1
        for op in (Op.F, Op.B)
        for stage in range(pp * vpp)
        for mb in range(microbatches)
    }
    assert dict(seen) == expected


# --- Action -------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [op for op in Op if op is not Op.FB])  # FB: its own test
def test_action_string_round_trip(op):
    for stage, microbatch in [(0, 0), (3, 5), (31, 127)]:
        action = Action(op, stage, microbatch)
        text = str(action)
        assert text == f"{op.value}{stage}.m{microbatch}"
        assert Action.parse(text) == action


def test_action_str_examples_and_bad_strings():
    assert str(Action(Op.F, 3, 5)) == "F3.m5"
    assert str(Action(Op.RECV_F, 2, 0)) == "RECV_F2.m0"
    for bad in ["F3", "X3.m5", "F3.5", "SEND3.m1", "F-1.m0", ""]:
        with pytest.raises(ValueError, match="<OP><stage>.m<microbatch>"):
            Action.parse(bad)
    with pytest.raises(ValueError, match=">= 0"):
        Action(Op.F, -1, 0)


def test_format_schedule_parses_back():
    actions = schedule(4, 2, 8)
    text = format_schedule(actions)
    assert text.splitlines()[0].startswith("rank 0: F0.m0 SEND_F0.m0")
    assert len(text.splitlines()) == 4
    assert parse_schedule(text) == actions
    with pytest.raises(ValueError, match="expected 'rank 0:"):
        parse_schedule("rank 1: F0.m0")


# --- generator -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pp, vpp, microbatches, message",
    [
        (0, 1, 4, "pp must be an integer >= 1"),
        (2, 0, 4, "vpp must be an integer >= 1"),
        (2, 1, 0, "microbatches must be an integer >= 1"),
        (2.0, 1, 4, "pp must be an integer >= 1"),
        (4, 2, 2, "needs microbatches >= pp"),
        (4, 2, 6, "multiple of pp=4"),
        (3, 3, 10, r"use a multiple of 3 \(e.g. 12\)"),
    ],
)
def test_invalid_shapes_are_refused(pp, vpp, microbatches, message):
    with pytest.raises(ValueError, match=message):
        interleaved_1f1b(pp, vpp, microbatches)
    with pytest.raises(ValueError, match=message):
        schedule(pp, vpp, microbatches)


def test_plain_1f1b_accepts_any_microbatch_count():
    # vpp == 1 has no microbatch groups, so m < pp and m % pp != 0 are fine.
    for pp, microbatches in [(4, 1), (4, 3), (4, 6)]:
        simulate(schedule(pp, 1, microbatches), pp, 1)


def test_pp2_vpp2_m4_order_from_the_definition():
    # Written out by hand from the definition: rank 0 warms up with 2*(2-0-1) + (2-1)*2 = 4
    # forwards, rank 1 with 2; forwards walk chunk 0 then chunk 1 in groups of pp=2
    # microbatches, backwards walk chunk 1 then chunk 0.
    expected = parse_schedule(
        """
        rank 0: F0.m0 F0.m1 F2.m0 F2.m1 F0.m2 B2.m0 F0.m3 B2.m1 F2.m2 B0.m0 F2.m3 B0.m1 B2.m2 B2.m3 B0.m2 B0.m3
        rank 1: F1.m0 F1.m1 F3.m0 B3.m0 F3.m1 B3.m1 F1.m2 B1.m0 F1.m3 B1.m1 F3.m2 B3.m2 F3.m3 B3.m3 B1.m2 B1.m3
        """  # noqa: E501
    )
    assert interleaved_1f1b(2, 2, 4) == expected


def test_plain_1f1b_order():
    # pp=3, m=4: rank r warms up with pp-r-1 forwards, then alternates, then drains.
    expected = parse_schedule(
        """
        rank 0: F0.m0 F0.m1 F0.m2 B0.m0 F0.m3 B0.m1 B0.m2 B0.m3
        rank 1: F1.m0 F1.m1 B1.m0 F1.m2 B1.m1 F1.m3 B1.m2 B1.m3
        rank 2: F2.m0 B2.m0 F2.m1 B2.m1 F2.m2 B2.m2 F2.m3 B2.m3
        """
    )
    assert interleaved_1f1b(3, 1, 4) == expected


@pytest.mark.parametrize("pp, vpp, microbatches", [(2, 2, 4), (4, 2, 8), (4, 3, 12), (4, 2, 4),
                                                   (8, 2, 24), (4, 1, 7), (4, 1, 2)])
def test_matches_megatron_core_order(pp, vpp, microbatches):
    """Cross-check against megatron-core's own schedule table and warm-up count."""
    pytest.importorskip("megatron.core")
    from megatron.core.pipeline_parallel.schedules import (
        get_pp_rank_microbatches,
        get_schedule_table,
    )

    table = get_schedule_table(microbatches, vpp, pp)  # group size per vp stage = pp
    ours = interleaved_1f1b(pp, vpp, microbatches)
    for rank in range(pp):
        communicator = types.SimpleNamespace(
            pp_group=types.SimpleNamespace(size=lambda: pp, rank=lambda r=rank: r),
            virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        )
        total, _, warmup, remaining = get_pp_rank_microbatches(
            microbatches, vpp, pp, p2p_communicator=communicator
        )
        assert total == microbatches * vpp

        def forward(k):
            mb, chunk = table[k]
            return Action(Op.F, chunk * pp + rank, mb)

        def backward(k):
            mb, chunk = table[k]
            return Action(Op.B, (vpp - 1 - chunk) * pp + rank, mb)

        megatron_order = [forward(k) for k in range(warmup)]
        for k in range(remaining):
            megatron_order += [forward(warmup + k), backward(k)]
        megatron_order += [backward(k) for k in range(remaining, total)]
        assert ours[rank] == megatron_order, f"rank {rank}"


# --- communication ----------------------------------------------------------------------------


def test_communication_is_inserted_around_cross_rank_hand_overs():
    """Each cross-rank input is received in the communication batch right before the compute
    that needs it, each output sent in the batch right after the compute that made it."""
    pp, vpp, microbatches = 2, 2, 4
    actions = schedule(pp, vpp, microbatches)
    last = pp * vpp - 1
    for rank, rank_actions in enumerate(actions):
        steps = comm_batches(rank_actions)
        for i, step in enumerate(steps):
            compute = step[0]
            if compute.op not in (Op.F, Op.B):
                continue
            s, mb = compute.stage, compute.microbatch
            before = {a for j in range(i - 1, -1, -1) if steps[j][0].op not in (Op.F, Op.B)
                      for a in steps[j]} if i else set()
            # the nearest communication batch before and after this compute action
            prev_batch = next((steps[j] for j in range(i - 1, -1, -1)
                               if steps[j][0].op not in (Op.F, Op.B)), [])
            next_batch = next((steps[j] for j in range(i + 1, len(steps))
                               if steps[j][0].op not in (Op.F, Op.B)), [])
            if compute.op is Op.F:
                assert (Action(Op.RECV_F, s, mb) in before) == (s > 0)
                assert (Action(Op.SEND_F, s, mb) in next_batch) == (s < last)
            else:
                assert (Action(Op.RECV_B, s, mb) in prev_batch
                        or Action(Op.RECV_B, s, mb) in before) == (s < last)
                assert (Action(Op.SEND_B, s, mb) in next_batch) == (s > 0)
    # The ring: stage 1 (rank 1) feeds stage 2 (rank 0).
    assert Action(Op.SEND_F, 1, 0) in actions[1] and Action(Op.RECV_F, 2, 0) in actions[0]
    assert Action(Op.SEND_B, 2, 0) in actions[0] and Action(Op.RECV_B, 1, 0) in actions[1]
    per_op = Counter(a.op for rank_actions in actions for a in rank_actions)
    hand_overs = (pp * vpp - 1) * microbatches
    assert per_op == {Op.F: 16, Op.B: 16, Op.SEND_F: hand_overs, Op.RECV_F: hand_overs,
                      Op.SEND_B: hand_overs, Op.RECV_B: hand_overs}


def test_plain_1f1b_pairs_facing_sends_in_one_batch():
    """pp=2: rank 0's next message to rank 1 is SEND_F while rank 1's is SEND_B; each batch
    holds the receive of the other's send (Megatron's send_forward_recv_backward)."""
    steps = [[[str(a) for a in step] for step in comm_batches(actions)]
             for actions in schedule(2, 1, 3)]
    assert steps[0][:5] == [["F0.m0"], ["SEND_F0.m0"], ["F0.m1"], ["SEND_F0.m1", "RECV_B0.m0"],
                            ["B0.m0"]]
    assert steps[1][:4] == [["RECV_F1.m0"], ["F1.m0"], ["B1.m0"], ["SEND_B1.m0", "RECV_F1.m1"]]


def old_placement(pp, vpp, microbatches):
    """Before batching: RECV right before its consumer, SEND right after its producer."""
    out = []
    for rank, compute in enumerate(interleaved_1f1b(pp, vpp, microbatches)):
        actions = []
        for a in compute:
            actions.extend(with_communication([[a] if r == rank else [] for r in range(pp)],
                                              pp, vpp)[rank])
        out.append(actions)
    return out


def test_unbatched_placement_deadlocks_under_rendezvous_but_not_buffered():
    """The mutant the rendezvous mode exists for: buffered sends (gloo) hide head-on sends."""
    broken = old_placement(2, 2, 4)
    simulate(broken, 2, 2, microbatches=4)  # fine with buffered sends
    with pytest.raises(ScheduleDeadlock, match="rendezvous"):
        simulate(broken, 2, 2, microbatches=4, rendezvous=True)


def test_messages_out_of_order_between_two_ranks_are_refused():
    actions = schedule(2, 1, 4)
    sends = [i for i, a in enumerate(actions[0]) if a.op is Op.SEND_F]
    a, b = sends[1], sends[2]
    actions[0][a], actions[0][b] = actions[0][b], actions[0][a]
    actions[0][a - 1], actions[0][b - 1] = actions[0][b - 1], actions[0][a - 1]  # their F too
    with pytest.raises(ScheduleError, match="posted in another order than they are received"):
        check_fifo(actions, 2)


SHAPES = [(pp, vpp, m) for pp in range(1, 17) for vpp in range(1, 5) if pp > 1 or vpp == 1
          for m in sorted({pp, 2 * pp} | ({1, pp + 1} if vpp == 1 else set()))]


@pytest.mark.parametrize("ep_overlap", [False, True])
@pytest.mark.parametrize("pp, vpp, m", SHAPES)
def test_every_generated_schedule_is_deadlock_free_under_rendezvous(pp, vpp, m, ep_overlap):
    """pp up to 16, vpp up to 4, with and without combined forward-backward actions: no
    head-on send, messages in order, nothing waits forever."""
    simulate(schedule(pp, vpp, m, ep_overlap), pp, vpp, 1.0, 2.0, microbatches=m,
             rendezvous=True)


def test_combined_actions_pair_independent_microbatches_and_print():
    actions = schedule(2, 2, 4, ep_overlap=True)
    pairs = [a for rank in actions for a in rank if a.op is Op.FB]
    assert pairs and all(a.parts[0].microbatch != a.parts[1].microbatch for a in pairs)
    assert Action.parse(str(pairs[0])) == pairs[0]
    assert parse_schedule(format_schedule(actions)) == actions
    assert_complete_on_owners([[p for a in rank for p in a.parts] for rank in actions], 2, 2, 4)
    # plain 1F1B with pp > 1 receives each backward's input between its F and its B:
    # only the first stage (nothing to receive) pairs
    plain = schedule(4, 1, 8, ep_overlap=True)
    assert any(a.op is Op.FB for a in plain[0]) and not any(a.op is Op.FB for a in plain[3])


def test_a_combined_pair_costs_less_than_its_parts():
    """An FB hides the all-to-alls of one half under the other's compute: with a2a_cost of
    each F and B in all-to-alls, it takes max(compute, comm) instead of F + B."""
    pp, vpp, m = 4, 2, 8
    plain = simulate(schedule(pp, vpp, m), pp, vpp, 1.0, 2.0, microbatches=m, a2a_cost=0.4)
    fb = simulate(schedule(pp, vpp, m, True), pp, vpp, 1.0, 2.0, microbatches=m, a2a_cost=0.4)
    assert fb.makespan < plain.makespan
    pairs = [t for t in fb.timeline_per_rank[0] if t.action.op is Op.FB]
    assert all(t.end - t.start == pytest.approx(3.0 - 0.8) for t in pairs)
    # with nothing to hide, pairing gains nothing (the extra warm-up forward costs a little)
    no_comm = simulate(schedule(pp, vpp, m, True), pp, vpp, 1.0, 2.0, microbatches=m)
    assert no_comm.makespan >= simulate(schedule(pp, vpp, m), pp, vpp, 1.0, 2.0,
                                        microbatches=m).makespan


def test_single_rank_has_no_communication():
    for vpp in (1, 3):
        actions = schedule(1, vpp, 3)
        assert actions == interleaved_1f1b(1, vpp, 3)
        assert all(a.op in (Op.F, Op.B) for a in actions[0])


def test_with_communication_refuses_non_compute_input():
    with pytest.raises(ValueError, match="compute actions"):
        with_communication([[Action(Op.SEND_F, 0, 0)], []], pp=2, vpp=1)
    with pytest.raises(ValueError, match="one action list per pipeline rank"):
        with_communication([[]], pp=2, vpp=1)


# --- simulator: bubble ------------------------------------------------------------------------


@pytest.mark.parametrize("forward_cost, backward_cost", COSTS)
@pytest.mark.parametrize("microbatches", [32, 64, 128])
def test_interleaved_bubble_matches_theory(microbatches, forward_cost, backward_cost):
    pp, vpp = 16, 2
    actions = schedule(pp, vpp, microbatches)
    assert_complete_on_owners(actions, pp, vpp, microbatches)
    result = simulate(actions, pp, vpp, forward_cost, backward_cost)  # raises on deadlock
    ideal = microbatches * vpp * (forward_cost + backward_cost)
    assert result.busy_time_per_rank == pytest.approx([ideal] * pp)
    theory = (pp - 1) / (vpp * microbatches)
    assert result.bubble_fraction == pytest.approx(theory, rel=0.01)


@pytest.mark.parametrize("forward_cost, backward_cost", COSTS)
@pytest.mark.parametrize("microbatches", [16, 32, 64])
def test_plain_1f1b_bubble_matches_theory(microbatches, forward_cost, backward_cost):
    pp = 16
    actions = schedule(pp, 1, microbatches)
    assert_complete_on_owners(actions, pp, 1, microbatches)
    result = simulate(actions, pp, 1, forward_cost, backward_cost)
    assert result.bubble_fraction == pytest.approx((pp - 1) / microbatches, rel=0.01)


def small_cases():
    for pp in (1, 2, 4):
        for vpp in (1, 2, 3):
            counts = [pp, 2 * pp, 3 * pp] if vpp > 1 else [1, 2, 3, 5, 8]
            for microbatches in counts:
                yield pp, vpp, microbatches


@pytest.mark.parametrize("pp, vpp, microbatches", list(small_cases()))
def test_small_cases_run_and_are_complete(pp, vpp, microbatches):
    actions = schedule(pp, vpp, microbatches)
    assert_complete_on_owners(actions, pp, vpp, microbatches)
    result = simulate(actions, pp, vpp, microbatches=microbatches)
    assert [len(t) for t in result.timeline_per_rank] == [len(a) for a in actions]
    if pp > 1 and microbatches >= pp:
        # 1F1B's bubble is independent of vpp's microbatch layout: (pp-1)/(vpp*m).
        assert result.bubble_fraction == pytest.approx((pp - 1) / (vpp * microbatches))


# --- simulator: timing semantics ----------------------------------------------------------------


def test_timing_of_a_hand_worked_two_rank_schedule():
    # rank 0: F 0-1, send; rank 1 waits for it, F 1-2, B 2-4, send grad; rank 0 waits till 4,
    # B 4-6. With latency 0.5 each message lands 0.5 later: F 1.5-2.5, B 2.5-4.5, B 5-7.
    actions = schedule(2, 1, 1)
    result = simulate(actions, 2, 1, forward_cost=1.0, backward_cost=2.0)
    timings = {str(t.action): (t.start, t.end) for rank in result.timeline_per_rank for t in rank}
    assert timings == {
        "F0.m0": (0, 1), "SEND_F0.m0": (1, 1), "RECV_B0.m0": (1, 4), "B0.m0": (4, 6),
        "RECV_F1.m0": (0, 1), "F1.m0": (1, 2), "B1.m0": (2, 4), "SEND_B1.m0": (4, 4),
    }
    assert result.makespan == 6
    assert result.busy_time_per_rank == [3, 3]
    assert result.bubble_fraction == pytest.approx((6 - 3) / 3)
    late = simulate(actions, 2, 1, forward_cost=1.0, backward_cost=2.0, p2p_latency=0.5)
    late_timings = {str(t.action): (t.start, t.end) for r in late.timeline_per_rank for t in r}
    assert late_timings["F1.m0"] == (1.5, 2.5)
    assert late_timings["B0.m0"] == (5, 7)
    assert late.makespan == 7


def test_format_timeline_marks_idle_time():
    result = simulate(schedule(2, 2, 4), 2, 2, forward_cost=1.0, backward_cost=1.0)
    rows = format_timeline(result, cell_width=5).splitlines()
    assert rows[1].startswith("rank 1: .....F1.0 ")  # rank 1 idles one unit for its input
    for rank, row in enumerate(rows):
        body = row.split(": ", 1)[1] + " "  # rows are right-stripped
        busy_units = result.busy_time_per_rank[rank]
        assert body.count(".....") == result.makespan - busy_units
        for timing in result.timeline_per_rank[rank]:
            a = timing.action
            if a.op in (Op.F, Op.B):
                assert f"{a.op.value}{a.stage}.{a.microbatch} " in body


# --- the checker checks -----------------------------------------------------------------------


def test_cross_rank_cycle_is_a_deadlock():
    # Rank 0 waits for the grad of microbatch 0 before sending its activation: rank 1 can never
    # run F1.m0, so neither rank moves.
    broken = parse_schedule(
        """
        rank 0: F0.m0 RECV_B0.m0 SEND_F0.m0 B0.m0
        rank 1: RECV_F1.m0 F1.m0 B1.m0 SEND_B1.m0
        """
    )
    with pytest.raises(ScheduleDeadlock) as error:
        simulate(broken, 2, 1)
    message = str(error.value)
    assert "rank 0 blocked at RECV_B0.m0 (position 1) waiting for SEND_B1.m0 on rank 1" in message
    assert "rank 1 blocked at RECV_F1.m0 (position 0) waiting for SEND_F0.m0 on rank 0" in message


def test_moving_a_recv_early_in_a_generated_schedule_deadlocks():
    pp, vpp, microbatches = 4, 2, 8
    actions = schedule(pp, vpp, microbatches)
    rank0 = actions[0]
    first_recv_b = next(i for i, a in enumerate(rank0) if a.op is Op.RECV_B)
    rank0.insert(0, rank0.pop(first_recv_b))  # wait for a grad before sending anything
    with pytest.raises(ScheduleDeadlock, match="rank 0 blocked at RECV_B"):
        simulate(actions, pp, vpp)


def mutate(pp, vpp, microbatches, change):
    actions = schedule(pp, vpp, microbatches)
    change(actions)
    return actions


def drop(rank, action_text):
    return lambda actions: actions[rank].remove(Action.parse(action_text))


def append(rank, action_text):
    return lambda actions: actions[rank].append(Action.parse(action_text))


def swap_with_previous(rank, action_text):
    def change(actions):
        i = actions[rank].index(Action.parse(action_text))
        actions[rank][i - 1], actions[rank][i] = actions[rank][i], actions[rank][i - 1]
    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (drop(0, "SEND_F0.m1"), "RECV_F1.m1 waits forever: no SEND_F0.m1"),
        (drop(1, "RECV_F1.m1"), "F1.m1 .*needs RECV_F1.m1 earlier on rank 1"),
        (drop(0, "B2.m3"), "SEND_B2.m3 .*needs B2.m3 earlier on rank 0"),
        (lambda a: a[0].remove(Action.parse("B0.m3")), "missing B0.m3"),
        (append(0, "F0.m0"), "more than once: F0.m0"),
        (lambda a: a.reverse(), r"RECV_F1.m0 \(rank 0, position 0\): stage 1 is held by rank 1"),
        (append(0, "F8.m0"), "stage out of range"),
        (append(0, "B0.m8"), "microbatch out of range"),
        (swap_with_previous(0, "SEND_F0.m0"), "SEND_F0.m0 .*needs F0.m0 earlier"),
        (swap_with_previous(1, "F1.m0"), "F1.m0 .*needs RECV_F1.m0 earlier"),
    ],
)
def test_malformed_schedules_are_rejected(change, message):
    with pytest.raises(ScheduleError, match=message):
        simulate(mutate(2, 4, 8, change), 2, 4, microbatches=8)


def test_backward_before_forward_is_rejected():
    broken = parse_schedule("rank 0: B0.m0 F0.m0")
    with pytest.raises(ScheduleError, match="B0.m0 .*needs F0.m0 earlier on rank 0"):
        simulate(broken, 1, 1)


def test_send_and_recv_on_the_same_rank_are_rejected():
    # pp == 1: stages hand over locally, so a SEND/RECV pair here is an error, not a no-op.
    broken = parse_schedule("rank 0: F0.m0 SEND_F0.m0 RECV_F1.m0 F1.m0 B1.m0 B0.m0")
    with pytest.raises(ScheduleError, match="stage 1 is not on another rank"):
        simulate(broken, 1, 2)


def test_local_hand_over_order_is_checked():
    # pp == 1, vpp == 2: F1 consumes F0's output locally, so F1 before F0 is an error.
    broken = parse_schedule("rank 0: F1.m0 F0.m0 B1.m0 B0.m0")
    with pytest.raises(ScheduleError, match="F1.m0 .*needs F0.m0 earlier on rank 0"):
        simulate(broken, 1, 2)


def test_dropping_the_last_microbatch_needs_the_count():
    actions = interleaved_1f1b(2, 1, 3)
    truncated = [[a for a in rank if a.microbatch < 2] for rank in actions]
    simulate(with_communication(truncated, 2, 1), 2, 1)  # looks complete for 2 microbatches
    with pytest.raises(ScheduleError, match="missing F0.m2"):
        simulate(with_communication(truncated, 2, 1), 2, 1, microbatches=3)


def test_owner_mapping_is_the_megatron_interleaving():
    pp = 4
    assert [stage_owner(s, pp) for s in range(12)] == [0, 1, 2, 3] * 3
    assert [local_chunk(s, pp) for s in range(12)] == [0] * 4 + [1] * 4 + [2] * 4


def test_per_action_costs_replace_forward_and_backward_costs():
    """pp=2, one microbatch, a slow last stage: F0 1, F1 3, B1 4, B0 2 run in a chain, so the
    makespan is 10; the ranks compute 3 and 7, the ideal is their mean 5, the bubble 1."""
    actions = schedule(2, 1, 1)
    costs = {Action.parse(a): c for a, c in (("F0.m0", 1), ("F1.m0", 3), ("B1.m0", 4),
                                              ("B0.m0", 2))}
    result = simulate(actions, 2, 1, microbatches=1, costs=costs)
    assert (result.makespan, result.busy_time_per_rank, result.ideal) == (10, [3, 7], 5)
    assert result.bubble_fraction == 1.0
    del costs[Action.parse("B0.m0")]
    with pytest.raises(ValueError, match="B0.m0"):
        simulate(actions, 2, 1, microbatches=1, costs=costs)
