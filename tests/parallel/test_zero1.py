"""ZeRO-1 against an unsharded torch.optim.AdamW + float64 clipping, bit for bit.

The multi-process test runs one launch of 4 gloo ranks. Every rank also runs the
unsharded reference over ALL parameters of the job (its own and the other ranks'),
so it can check its own parameters without any extra communication. Per-rank
gradients are dyadic rationals (k / 32 times a power of two) that bf16 represents
exactly, so every sum (over microbatches, over ranks, of squares in float64) is exact
in any order, and the reference receives exactly the summed gradient the collectives
produce: the comparison is `torch.equal`, not a tolerance.

Gradients reach the optimizer through real backwards (`(p * g).sum().backward()`), two
"microbatches" per step, the second inside `last_backward` (so buckets start their
reduce-scatter from the gradient hooks), or both outside it (the synchronous path).
With bf16 the reference keeps fp32 masters and copies them into bf16 parameters.
"""
from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from parallel.adamw import AdamW, AdamWConfig
from parallel.bucket_layout import plan_buckets
from parallel.zero1 import ParamGroup, Zero1Optimizer, decay_matrices_only
from tests.parallel.zero1_mutants import drop_reduce_scatter, read_before_reduce_scatter
from trainer.checkpoint import CheckpointManager

WORLD = 4
CONFIG = AdamWConfig(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
MAX_NORM = 5.0
LRS = (1e-2, 5e-3, 2e-3)
# Scale of the gradients per step: step 1 stays under MAX_NORM (no clipping), later
# steps are clipped. Powers of two keep the dyadic sums exact.
GRAD_SCALES = (1 / 16, 1.0, 8.0)
BUCKET_NUMEL = 40


@dataclass(frozen=True)
class Spec:
    """One parameter of the job: a global key, its shape, and the ranks holding it."""

    key: str
    shape: tuple[int, ...]
    members: tuple[int, ...]


def _seeded(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def _initial(spec: Spec) -> torch.Tensor:
    return torch.randn(spec.shape, generator=_seeded("init/" + spec.key))


def _rank_grad(spec: Spec, step: int, rank: int, microbatch: int) -> torch.Tensor:
    g = torch.randint(-64, 65, spec.shape,
                      generator=_seeded(f"grad/{spec.key}/{step}/{rank}/{microbatch}"))
    return g.float() / 32 * GRAD_SCALES[step]


# Odd sizes (padding), 1-D params (no decay), a 3-D param, and params larger than the
# bucket (60, 110 > 40). With 40-element buckets: [35] [13] [60] [110] [1, 9, 6].
SHAPES = [(7, 5), (13,), (3, 4, 5), (10, 11), (1,), (9,), (2, 3)]


def _one_world_group() -> list[list[Spec]]:
    return [[Spec(f"w{i}", s, (0, 1, 2, 3)) for i, s in enumerate(SHAPES)]]


def _dense_expert_local() -> list[list[Spec]]:
    """Dense params over the world; experts on {0,2} and {1,3} (different values);
    one world-of-one group per rank holding params nobody else holds (DP = 1 stage)."""
    dense = [Spec(f"dense{i}", s, (0, 1, 2, 3)) for i, s in enumerate([(6, 5), (7,), (9, 9)])]
    experts_a = [Spec(f"ea{i}", s, (0, 2)) for i, s in enumerate([(5, 3), (3, 7), (11,)])]
    experts_b = [Spec(f"eb{i}", s, (1, 3)) for i, s in enumerate([(5, 3), (3, 7), (11,)])]
    local = [[Spec(f"local{r}.{i}", s, (r,)) for i, s in enumerate([(r + 2, 3), (r + 1,)])]
             for r in range(WORLD)]
    return [dense, experts_a, experts_b, *local]


class Run:
    """Sharded optimizer on this rank plus the unsharded reference over every param."""

    def __init__(self, rank: int, groups: list[list[Spec]], pgs: dict, *,
                 dtype=torch.float32, overlap=True, skip_grad=frozenset(), groups_of=None,
                 contributes=None, norm_group=None):
        self.rank, self.groups, self.skip_grad = rank, groups, skip_grad
        # whose gradients this rank's backward adds (a re-sharded run: several ranks' worth)
        self.contributes = contributes or (rank,)
        self.dtype, self.overlap = dtype, overlap
        self.all_specs = [s for g in groups for s in g]
        self.master = {s.key: nn.Parameter(_initial(s)) for s in self.all_specs}
        decayed = [p for p in self.master.values() if p.dim() >= 2]
        plain = [p for p in self.master.values() if p.dim() < 2]
        self.ref_opt = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": CONFIG.weight_decay},
             {"params": plain, "weight_decay": 0.0}],
            lr=LRS[0], betas=(CONFIG.beta1, CONFIG.beta2), eps=CONFIG.eps, foreach=False)
        self.mine = {s.key: nn.Parameter(_initial(s)) for s in self.all_specs
                     if rank in s.members}
        # which ranks share a group: by default the members; a test may regroup (re-shard)
        groups_of = groups_of or (lambda g: g[0].members)
        self.param_groups = [
            ParamGroup([self.mine[s.key] for s in g], pgs[groups_of(g)], [s.key for s in g])
            for g in groups if rank in g[0].members]
        self.zero = Zero1Optimizer(self.param_groups, norm_group=norm_group or dist.group.WORLD,
                                   rule=AdamW(CONFIG), max_grad_norm=MAX_NORM,
                                   bucket_numel=BUCKET_NUMEL, param_dtype=dtype,
                                   overlap_grad_reduce=overlap)

    def backward(self, step: int) -> None:
        """Two microbatches of real backwards; the second is the step's last."""
        for microbatch in (0, 1):
            terms = [(p * sum(_rank_grad(s, step, r, microbatch) for r in self.contributes)
                      .to(self.dtype)).sum()
                     for s in self.all_specs if (p := self.mine.get(s.key)) is not None
                     and (step, s.key, self.rank) not in self.skip_grad]
            if microbatch == 1:
                with self.zero.last_backward(self.mine.values()):
                    torch.stack(terms).sum().backward()
            else:
                torch.stack(terms).sum().backward()

    def step(self, step: int) -> tuple[float, float]:
        """One step of both; returns (sharded norm, reference norm)."""
        for s in self.all_specs:
            contributions = [_rank_grad(s, step, r, mb) for r in s.members for mb in (0, 1)
                             if (step, s.key, r) not in self.skip_grad]
            self.master[s.key].grad = torch.stack(contributions).sum(0)
        grads = [p.grad for p in self.master.values()]
        ref_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])).float()
        torch._foreach_mul_(grads, (MAX_NORM / (ref_norm + 1e-6)).clamp(max=1.0))
        for g in self.ref_opt.param_groups:
            g["lr"] = LRS[step]
        self.ref_opt.step()
        self.backward(step)
        norm = self.zero.step(LRS[step])
        self.zero.zero_grad()
        return float(norm), float(ref_norm)

    def check(self, norm: float, ref_norm: float, what: str) -> None:
        assert norm == ref_norm, f"{what}: grad norm {norm!r} != reference {ref_norm!r}"
        for key, param in self.mine.items():
            ref = self.master[key].detach().to(self.dtype)
            assert param.dtype == self.dtype and torch.equal(param.detach(), ref), \
                f"{what}: param {key} differs by {(param.float() - ref.float()).abs().max()}"

    def unsharded_state_bytes(self, keys) -> int:
        return sum(t.numel() * t.element_size() for p in (self.master[k] for k in keys)
                   for name, t in self.ref_opt.state[p].items() if name != "step")


def _train(run: Run, what: str, steps=range(len(LRS))) -> None:
    for step in steps:
        run.check(*run.step(step), what=f"{what}, step {step + 1}")
        assert run.ref_opt.state[next(iter(run.master.values()))]["step"].item() == \
            run.zero.step_count


def _scenario_one_world_group(rank: int, pgs: dict) -> None:
    # rank 1 has no gradient for the bias at step 2: it must count as zeros.
    for dtype in (torch.float32, torch.bfloat16):
        for overlap in (True, False):
            run = Run(rank, _one_world_group(), pgs, dtype=dtype, overlap=overlap,
                      skip_grad=frozenset({(2, "w1", 1)}))
            buckets = run.zero.groups[0].buckets
            assert [len(b.slots) for b in buckets] == [1, 1, 1, 1, 3], "bucket packing changed"
            _train(run, f"one world group, {dtype}, overlap={overlap}")
    # Per-rank state is 1/4 of the unsharded AdamW state, up to padding.
    unsharded = run.unsharded_state_bytes(run.mine)
    padding_bound = 2 * 4 * len(buckets)
    assert 0 <= run.zero.state_bytes() - unsharded / WORLD < padding_bound, \
        (run.zero.state_bytes(), unsharded)
    memory = run.zero.memory_bytes()
    assert memory["weights"] == 2 * memory["grads"] / 4 and memory["master"] == memory["state"] / 2


def _scenario_dense_expert_local(rank: int, pgs: dict) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        run = Run(rank, _dense_expert_local(), pgs, dtype=dtype)
        assert [g.size for g in run.zero.groups] == [4, 2, 1]
        _train(run, f"dense/expert/local, {dtype}")
    expected = sum(run.unsharded_state_bytes([p for p in run.mine if p.startswith(prefix)])
                   / size for prefix, size in (("dense", 4), ("e", 2), ("local", 1)))
    n_buckets = sum(len(g.buckets) for g in run.zero.groups)
    assert 0 <= run.zero.state_bytes() - expected < 2 * 4 * n_buckets


def _mutant_runs_fail(rank: int, pgs: dict) -> None:
    """A dropped reduce-scatter, or a shard read before its reduce-scatter completed,
    must fail the same comparison (each rank then updates with its own gradient only)."""
    dropped = Run(rank, _one_world_group(), pgs)
    drop_reduce_scatter(dropped.zero, lambda group, b: b == 1)
    with pytest.raises(AssertionError):
        _train(dropped, "dropped bucket")
    early = Run(rank, _one_world_group(), pgs)
    read_before_reduce_scatter(early.zero)
    with pytest.raises(AssertionError):
        _train(early, "read before the reduce-scatter completed")


def _late_gradient_is_refused(rank: int, pgs: dict) -> None:
    run = Run(rank, _one_world_group(), pgs)
    run.backward(0)
    param = run.mine["w0"]
    with pytest.raises(RuntimeError, match="after its last backward"):
        (param * 2).sum().backward()
    run.zero.step(LRS[0])  # the collectives launched so far complete on every rank


def _checkpoint_reshards(rank: int, pgs: dict, directory: str) -> None:
    """Saved after 2 steps with the world group (dp=4); loaded into groups of 2 and of 1
    (and bf16 masters into fp32), the third step gives the uninterrupted run's bits."""
    for dtype in (torch.float32, torch.bfloat16):
        run = Run(rank, _one_world_group(), pgs, dtype=dtype)
        _train(run, "before the save", steps=range(2))
        manager = CheckpointManager(os.path.join(directory, str(dtype)), keep=1)
        path = manager.save(2, dict(run.mine), run.zero.state_pieces(), {})
        _train(run, "uninterrupted", steps=[2])
        pair = (0, 2) if rank in (0, 2) else (1, 3)  # dp=2: each adds two ranks' gradients
        for regroup, contributes, load_dtype in (
                (pair, (0, 1) if rank < 2 else (2, 3), dtype),
                ((rank,), (0, 1, 2, 3), dtype),  # dp=1: every rank holds and adds everything
                ((0, 1, 2, 3), (rank,), torch.float32)):
            # the norm covers one copy of the parameters: the group that holds them
            again = Run(rank, _one_world_group(), pgs, dtype=load_dtype,
                        groups_of=lambda g: regroup, contributes=contributes,
                        norm_group=pgs[("norm", regroup)])
            saved = manager.saved_keys(path)
            weights, state = again.zero.load_targets(lambda n: f"optim.{n}.master" in saved)
            manager.load(path, weights, state, same_world=True)
            again.zero.finish_load(2)
            again.backward(2)
            again.zero.step(LRS[2])
            for key, param in again.mine.items():  # bf16 masters continued in fp32: their bits
                assert torch.equal(param.to(dtype), run.mine[key]), (key, regroup, load_dtype)


def _scenario_layout_mismatch(rank: int, pgs: dict) -> None:
    # Same element counts, different shapes on rank 2: (5, 4) vs (4, 5).
    shape = (4, 5) if rank == 2 else (5, 4)
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(shape))]
    members = (0, 2) if rank in (0, 2) else (1, 3)
    group = ParamGroup(params, pgs[members], ["bias", "experts.w"])
    if rank in (0, 2):
        with pytest.raises(ValueError) as error:
            Zero1Optimizer([group], norm_group=dist.group.WORLD)
        message = str(error.value)
        assert "ranks 0 and 2" in message and "(5, 4)" in message and "(4, 5)" in message, \
            message
        assert "'experts.w'" in message, message
    else:
        Zero1Optimizer([group], norm_group=dist.group.WORLD)  # identical layouts: no error
    with pytest.raises(ValueError, match="norm_group"):
        Zero1Optimizer([ParamGroup([nn.Parameter(torch.zeros(3))], pgs[(0, 1, 2, 3)])],
                       norm_group=None)


def _worker(rank: int, init_file: str, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        pgs = {(0, 1, 2, 3): dist.group.WORLD, (0, 2): dist.new_group([0, 2]),
               (1, 3): dist.new_group([1, 3])}
        pgs.update({(r,): None for r in range(WORLD)})
        pgs.update({("norm", members): group for members, group in pgs.items()})
        pgs.update({("norm", (r,)): dist.new_group([r]) for r in range(WORLD)})
        _scenario_one_world_group(rank, pgs)
        _scenario_dense_expert_local(rank, pgs)
        _mutant_runs_fail(rank, pgs)
        _late_gradient_is_refused(rank, pgs)
        _checkpoint_reshards(rank, pgs, directory)
        _scenario_layout_mismatch(rank, pgs)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # four gloo ranks
def test_zero1_matches_unsharded_adamw_on_4_gloo_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), os.path.join(tmp, "run")),
                 nprocs=WORLD, join=True)


# ---------------------------------------------------------------- single process


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_world_of_one_matches_torch_adamw(dtype):
    torch.set_num_threads(1)
    pgs = {(0,): None}
    specs = [[Spec(f"w{i}", s, (0,)) for i, s in enumerate(SHAPES)]]
    run = Run(0, specs, pgs, dtype=dtype)
    _train(run, f"world of one, {dtype}")
    assert run.zero.state_bytes() == run.unsharded_state_bytes(run.mine)


def test_plan_buckets_covers_every_element_once_per_rank_shards():
    names = [f"p{i}" for i in range(len(SHAPES))]
    decays = [len(s) >= 2 for s in SHAPES]
    for group_size in (1, 2, 3, 4):
        buckets = plan_buckets(SHAPES, names, decays, bucket_numel=40, group_size=group_size)
        slots = [slot for b in buckets for slot in b.slots]
        assert [s.index for s in slots] == list(range(len(SHAPES)))
        for b in buckets:
            assert b.padded_numel % group_size == 0 and b.padded_numel - b.numel < group_size
            assert b.numel <= 40 or len(b.slots) == 1, "only a lone param may exceed the size"
            covered = torch.zeros(b.numel, dtype=torch.int64)
            for rank in range(group_size):
                for piece in b.pieces(rank):
                    covered[piece.bucket_start:piece.bucket_end] += 1
                    assert piece.bucket_start - piece.slot.offset == piece.param_start
                for start, end in b.decay_ranges(rank):
                    assert 0 <= start < end <= b.shard_numel
            assert bool((covered == 1).all()), "every element in exactly one shard"
        # Greedy packing: the next param of a bucket would not have fit.
        for before, after in zip(buckets, buckets[1:]):
            assert before.numel + after.slots[0].numel > 40


def test_params_become_views_of_one_buffer_and_grads_accumulate_there():
    torch.set_num_threads(1)
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]
    before = [p.detach().clone() for p in params]
    zero = Zero1Optimizer([(params, None)], norm_group=None, bucket_numel=12)
    group = zero.groups[0]
    assert [len(b.slots) for b in group.buckets] == [1, 1]
    for p, value in zip(params, before):
        assert torch.equal(p, value)
        assert p.untyped_storage().data_ptr() == group.params_flat.untyped_storage().data_ptr()
    (params[0].sum() * 2 + params[1].sum()).backward()
    (params[0].sum()).backward()
    assert torch.equal(group.grads_flat[:12], torch.full((12,), 3.0))
    assert torch.equal(group.grads_flat[12:], torch.ones(5))
    zero.zero_grad()
    assert not group.grads_flat.any() and params[0].grad is not None
    params[1].grad = torch.ones(5)  # replacing the view would lose gradients: refused
    with pytest.raises(RuntimeError, match="no longer its view"):
        zero.step(1e-3)


def test_invalid_params_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="fp32"):
        Zero1Optimizer([([nn.Parameter(torch.zeros(3, dtype=torch.float64))], None)],
                       norm_group=None)
    with pytest.raises(ValueError, match="fp16 would need loss scaling"):
        Zero1Optimizer([([nn.Parameter(torch.zeros(3))], None)], norm_group=None,
                       param_dtype=torch.float16)
    with pytest.raises(ValueError, match="does not require grad"):
        Zero1Optimizer([([nn.Parameter(torch.zeros(3), requires_grad=False)], None)],
                       norm_group=None)
    shared = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="exactly one group once"):
        Zero1Optimizer([([shared], None), ([shared], None)], norm_group=None)
    with pytest.raises(ValueError, match="bucket_numel"):
        Zero1Optimizer([([nn.Parameter(torch.zeros(3))], None)], norm_group=None,
                       bucket_numel=0)
    zero = Zero1Optimizer([([nn.Parameter(torch.zeros(3))], None)], norm_group=None)
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        with zero.last_backward([torch.zeros(3)]):
            pass
    assert decay_matrices_only("w", torch.zeros(2, 2)) and not decay_matrices_only("b",
                                                                                  torch.zeros(2))
