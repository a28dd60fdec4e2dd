"""The DEP plan: order independence, LPT balance against brute force, skew, exchange splits, digest check.

The balance tests compare with the exact optimum found by exhaustive search over
all assignments of small instances, never with numbers written down by hand.
The multi-process test runs 3 gloo ranks (mp.spawn) where one rank perturbs its
plan: every rank must raise DepPlanMismatch naming the digests, none may hang.
"""
from __future__ import annotations

import itertools
import os
import random
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dataloader.batch import MediaItem
from parallel.dep_plan import (DepPlanMismatch, MediaRef, cost_patches, plan_media,
                               send_recv_splits, verify_same_plan)

torch.set_num_threads(1)


def random_refs(rng: random.Random, count: int, replicas: int = 2, microbatches: int = 3,
                max_side: int = 8) -> list[MediaRef]:
    ids = rng.sample(range(10 * count + 10), count)  # unique, not contiguous, not sorted
    refs = []
    for item_id in ids:
        t, h, w = rng.randint(1, 4), 2 * rng.randint(1, max_side), 2 * rng.randint(1, max_side)
        refs.append(MediaRef(item_id, rng.randrange(replicas), rng.randrange(microbatches),
                             t * h * w, (h // 2) * (w // 2)))
    return refs


def optimal_max_load(costs: list[int], world: int) -> int:
    """Exact optimum by trying every assignment (small instances only)."""
    best = sum(costs)
    for assignment in itertools.product(range(world), repeat=len(costs)):
        load = [0] * world
        for cost, rank in zip(costs, assignment):
            load[rank] += cost
        best = min(best, max(load))
    return best


# ---------------------------------------------------------------- determinism and order


def test_plan_is_independent_of_input_order_and_deterministic():
    rng = random.Random(0)
    refs = random_refs(rng, 40, replicas=2)
    reference = plan_media(refs, 4, [0, 1])
    assert reference == plan_media(list(refs), 4, [0, 1])  # same call twice
    for seed in range(5):
        shuffled = list(refs)
        random.Random(seed).shuffle(shuffled)
        plan = plan_media(shuffled, 4, [0, 1])
        assert plan.digest() == reference.digest()
        assert plan == reference
    assert [r.item_id for r in reference.items] == sorted(r.item_id for r in refs)
    # the digest sees every field: change one item's patch count and it changes
    bumped = [MediaRef(r.item_id, r.replica, r.microbatch, r.num_patches + 4, r.num_tokens)
              if i == 7 else r for i, r in enumerate(refs)]
    assert plan_media(bumped, 4, [0, 1]).digest() != reference.digest()
    # a different owner table changes the plan's digest too
    assert plan_media(refs, 4, [2, 3]).digest() != reference.digest()
    # so does another cost model, even one that leads to the same assignment
    doubled = plan_media(refs, 4, [0, 1], cost=lambda r: 2 * r.num_patches)
    assert doubled.encoder_rank == reference.encoder_rank
    assert doubled.digest() != reference.digest()


def test_ties_go_to_lowest_rank_then_lowest_item_id():
    refs = [MediaRef(i, 0, 0, 8, 2) for i in (9, 3, 5, 1)]  # equal costs
    plan = plan_media(refs, 3, [0])
    # taken in item-id order 1, 3, 5, 9; ranks 0, 1, 2 then back to 0 (all tied at 8)
    assert [r.item_id for r in plan.items] == [1, 3, 5, 9]
    assert plan.encoder_rank == (0, 1, 2, 0)


def test_callable_owner_table_and_custom_cost():
    refs = random_refs(random.Random(1), 12, replicas=3)
    by_list = plan_media(refs, 6, [0, 1, 2])
    by_fn = plan_media(refs, 6, lambda replica: replica)
    assert by_list == by_fn
    for ref, owner in zip(by_fn.items, by_fn.owner_rank):
        assert owner == ref.replica

    def tokens_cost(ref):
        return ref.num_tokens

    plan = plan_media(refs, 6, [0, 1, 2], cost=tokens_cost)
    assert plan.costs == tuple(r.num_tokens for r in plan.items)
    assert sum(plan.load_per_rank(6)) == sum(r.num_tokens for r in refs)


# ---------------------------------------------------------------- balance


def test_load_within_one_item_of_brute_force_optimum_and_lpt_bound():
    rng = random.Random(2)
    world = 3
    for _ in range(25):
        refs = random_refs(rng, rng.randint(1, 9), max_side=6)
        plan = plan_media(refs, world, [0, 1])
        load = plan.load_per_rank(world)
        costs = [cost_patches(r) for r in refs]
        opt = optimal_max_load(costs, world)
        assert sum(load) == sum(costs)
        assert max(load) - opt <= max(costs)
        # Graham's bound: max_load <= (4/3 - 1/(3m)) * OPT, in integers
        assert 3 * world * max(load) <= (4 * world - 1) * opt


@pytest.mark.parametrize("world, patch_counts", [
    (2, [3, 3, 2, 2, 2]),  # Graham's tight instance for m = 2
    (3, [5, 5, 4, 4, 3, 3, 3]),  # and for m = 3
])
def test_lpt_bound_on_its_tight_instances(world, patch_counts):
    refs = [MediaRef(i, 0, 0, p, 1) for i, p in enumerate(patch_counts)]
    plan = plan_media(refs, world, [0])
    opt = optimal_max_load(patch_counts, world)
    worst = max(plan.load_per_rank(world))
    assert worst > opt  # LPT is not optimal here ...
    assert 3 * world * worst <= (4 * world - 1) * opt  # ... but never worse than the bound


def skewed_batch() -> tuple[list[MediaRef], MediaRef]:
    """Global batch of 2 replicas x 4 microbatches: mostly small images, a few large, some
    4-frame chunks, and one image with more patches than all others together."""
    rng = random.Random(3)
    items, item_id = [], 0
    for replica in range(2):
        for microbatch in range(4):
            grids = [(1, 2 * rng.randint(2, 6), 2 * rng.randint(2, 6)) for _ in range(6)]
            if microbatch == 1:
                grids.append((1, 32, 24))  # large image
            if microbatch == 2:
                grids += [(4, 8, 8), (3, 6, 10)]  # video chunks
            if microbatch == 3 and replica == 0:
                grids = []  # a text-only microbatch
            for grid in grids:
                items.append(MediaRef.of(MediaItem(item_id, grid, 0, 0), replica, microbatch))
                item_id += 1
    rest = sum(r.num_patches for r in items)
    side = 2 * (int(rest ** 0.5) // 2 + 2)  # even, and side*side > rest
    huge = MediaRef.of(MediaItem(item_id, (1, side, side), 0, 0), 1, 0)
    assert huge.num_patches > rest
    return items + [huge], huge


def test_skewed_batch_assigns_everything_once_and_isolates_the_huge_image():
    refs, huge = skewed_batch()
    world = 4  # pp=2 dp=2: stage 0 of replicas 0, 1 are ranks 0, 1
    plan = plan_media(refs, world, [0, 1])
    encoded = [ref for rank in range(world) for ref in plan.items_encoded_by(rank)]
    assert sorted(r.item_id for r in encoded) == sorted(r.item_id for r in refs)
    assert len(encoded) == len(refs)
    huge_rank = plan.encoder_rank[plan.items.index(huge)]
    assert plan.items_encoded_by(huge_rank) == [huge]
    load = plan.load_per_rank(world)
    assert max(load) == huge.num_patches  # nobody waits longer than the unavoidable item
    others = [load[r] for r in range(world) if r != huge_rank]
    largest_other = max(r.num_patches for r in refs if r is not huge)
    assert max(others) - min(others) <= largest_other
    owned = [ref for rank in range(world) for ref in plan.items_owned_by(rank)]
    assert sorted(r.item_id for r in owned) == sorted(r.item_id for r in refs)
    assert all(plan.owner_rank[i] == ref.replica for i, ref in enumerate(plan.items))
    assert plan.items_owned_by(2) == plan.items_owned_by(3) == []


def test_empty_plan_and_world_of_one():
    empty = plan_media([], 4, [0, 1])
    assert empty.items == empty.encoder_rank == empty.owner_rank == ()
    assert empty.load_per_rank(4) == [0, 0, 0, 0]
    assert empty.digest() == plan_media(iter(()), 4, [0, 1]).digest()
    splits = send_recv_splits(empty, 2, 4)
    assert splits.send_rows == splits.recv_rows == [0, 0, 0, 0]

    refs = random_refs(random.Random(4), 7, replicas=1)
    single = plan_media(refs, 1, [0])
    assert single.encoder_rank == single.owner_rank == (0,) * 7
    assert single.load_per_rank(1) == [sum(r.num_patches for r in refs)]
    splits = send_recv_splits(single, 0, 1)
    assert splits.send == splits.recv == (single.items,)


# ---------------------------------------------------------------- the exchange


def test_send_recv_splits_route_every_item_once_and_place_rows():
    refs, _ = skewed_batch()
    world = 4
    plan = plan_media(refs, world, [0, 1])
    splits = [send_recv_splits(plan, rank, world) for rank in range(world)]
    sent = [(src, dst, ref) for src in range(world) for dst in range(world)
            for ref in splits[src].send[dst]]
    received = [(src, dst, ref) for dst in range(world) for src in range(world)
                for ref in splits[dst].recv[src]]
    assert sorted(r.item_id for _, _, r in sent) == sorted(r.item_id for r in refs)
    assert sorted(r.item_id for _, _, r in received) == sorted(r.item_id for r in refs)
    for src, dst, ref in sent + received:
        index = plan.items.index(ref)
        assert (src, dst) == (plan.encoder_rank[index], plan.owner_rank[index])
    for src in range(world):
        for dst in range(world):
            assert splits[src].send[dst] == splits[dst].recv[src]
            ids = [r.item_id for r in splits[src].send[dst]]
            assert ids == sorted(ids)

    # Simulate all_to_all_single: each encoder fills its rows with the item id; each owner
    # must find every item it owns, whole and in item-id order per source.
    send_buffers = []
    for src in range(world):
        rows = [torch.full((ref.num_tokens, 1), float(ref.item_id))
                for dst in range(world) for ref in splits[src].send[dst]]
        buffer = torch.cat(rows) if rows else torch.zeros(0, 1)
        assert buffer.shape[0] == sum(splits[src].send_rows)
        send_buffers.append(buffer.split(splits[src].send_rows))
    for dst in range(world):
        chunks = [send_buffers[src][dst] for src in range(world)]
        assert [c.shape[0] for c in chunks] == splits[dst].recv_rows
        received_rows = torch.cat(chunks)
        cursor = 0
        for src in range(world):
            for ref in splits[dst].recv[src]:
                block = received_rows[cursor:cursor + ref.num_tokens]
                assert bool((block == ref.item_id).all())
                cursor += ref.num_tokens
        assert cursor == received_rows.shape[0]
        assert cursor == sum(r.num_tokens for r in plan.items_owned_by(dst))


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("refs, world, owners, match", [
    ([MediaRef(1, 0, 0, 4, 1), MediaRef(1, 0, 1, 4, 1)], 2, [0], "appears twice"),
    ([MediaRef(1, 2, 0, 4, 1)], 4, [0, 1], "lists only 2 replicas"),
    ([MediaRef(1, 0, 0, 4, 1)], 2, [5], "outside the job's ranks"),
    ([MediaRef(1, 0, 0, 0, 1)], 2, [0], "must be positive"),
    ([MediaRef(1, -1, 0, 4, 1)], 2, [0], "must be >= 0"),
    ([], 0, [0], "at least one rank"),
])
def test_invalid_input_is_refused(refs, world, owners, match):
    with pytest.raises(ValueError, match=match):
        plan_media(refs, world, owners)


def test_non_integer_or_negative_cost_is_refused():
    refs = [MediaRef(1, 0, 0, 4, 1)]
    with pytest.raises(TypeError, match="round a calibrated cost"):
        plan_media(refs, 2, [0], cost=lambda r: r.num_patches * 1.5)
    with pytest.raises(ValueError, match=">= 0"):
        plan_media(refs, 2, [0], cost=lambda r: -1)
    plan = plan_media([MediaRef(1, 0, 0, 4, 1)], 2, [1])
    with pytest.raises(ValueError, match="world size"):
        send_recv_splits(plan, 0, 1)


# ---------------------------------------------------------------- across processes

WORLD = 3


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    refs = random_refs(random.Random(5), 20, replicas=WORLD)
    lines = []
    # every rank sees its refs in a different order: same plan, check passes
    shuffled = list(refs)
    random.Random(rank).shuffle(shuffled)
    owners = [0, 1, 2]  # pp=1, dp=3: stage 0 of replica r is rank r
    plan = plan_media(shuffled, WORLD, owners)
    verify_same_plan(plan, dist.group.WORLD)
    lines.append(f"agree {owners} {plan.digest()}")
    # rank 1 plans from different metadata: every rank must raise
    if rank == 1:
        shuffled[0] = MediaRef(shuffled[0].item_id, shuffled[0].replica, shuffled[0].microbatch,
                               shuffled[0].num_patches + 2, shuffled[0].num_tokens)
    try:
        verify_same_plan(plan_media(shuffled, WORLD, owners), dist.group.WORLD)
        lines.append("no error")
    except DepPlanMismatch as error:
        lines.append("mismatch " + str(error))
    dist.barrier()  # the job is still alive and in step after the error
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(lines))
    dist.destroy_process_group()


@pytest.mark.slow  # several gloo ranks
@pytest.mark.timeout(180)
def test_forged_mismatch_raises_on_every_rank_naming_the_digests():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        outputs = [open(os.path.join(tmp, f"rank{r}.txt")).read().splitlines()
                   for r in range(WORLD)]
    refs = random_refs(random.Random(5), 20, replicas=WORLD)
    good = plan_media(refs, WORLD, [0, 1, 2]).digest()
    forged_refs = list(refs)
    random.Random(1).shuffle(forged_refs)
    first = forged_refs[0]
    forged_refs[0] = MediaRef(first.item_id, first.replica, first.microbatch,
                              first.num_patches + 2, first.num_tokens)
    forged = plan_media(forged_refs, WORLD, [0, 1, 2]).digest()
    assert forged != good
    for rank, (agree, mismatch) in enumerate(outputs):
        assert agree == f"agree [0, 1, 2] {good}"
        assert mismatch.startswith(f"mismatch DEP plan mismatch on rank {rank}: ")
    for rank in (0, 2):  # the honest ranks name their digest and the forger's
        assert f"this rank's plan digest is {good}" in outputs[rank][1]
        assert f"rank 1 has {forged}" in outputs[rank][1]
        assert f"rank {2 - rank} has" not in outputs[rank][1]  # the other honest rank agrees
    assert f"this rank's plan digest is {forged}" in outputs[1][1]  # the forger names both
    assert f"rank 0 has {good}" in outputs[1][1] and f"rank 2 has {good}" in outputs[1][1]
