"""ZeRO-1 against an unsharded torch.optim.AdamW + clip_grad_norm_ on the same params.

The multi-process test runs one launch of 4 gloo ranks. Every rank also runs the
unsharded reference over ALL parameters of the job (its own and the other ranks'),
so it can check its own parameters without any extra communication. Per-rank
gradients are dyadic rationals (k / 32), so their sum is exact in fp32 and the
reference receives exactly the summed gradient the collectives should produce.
"""
from __future__ import annotations

import copy
import os
import tempfile
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from parallel.adamw import AdamWConfig
from parallel.zero1 import (ParamGroup, Zero1Optimizer, decay_matrices_only, plan_buckets)

WORLD = 4
CONFIG = AdamWConfig(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
MAX_NORM = 5.0
LRS = (1e-2, 5e-3, 2e-3)
# Scale of the gradients per step: step 1 stays under MAX_NORM (no clipping), later
# steps are clipped. Powers of two keep the dyadic sums exact.
GRAD_SCALES = (1 / 16, 1.0, 8.0)
BUCKET_NUMEL = 40
RTOL = 1e-6


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


def _rank_grad(spec: Spec, step: int, rank: int) -> torch.Tensor:
    g = torch.randint(-64, 65, spec.shape, generator=_seeded(f"grad/{spec.key}/{step}/{rank}"))
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

    def __init__(self, rank: int, groups: list[list[Spec]], pgs: dict, skip_grad=frozenset()):
        self.rank, self.groups, self.skip_grad = rank, groups, skip_grad
        self.all_specs = [s for g in groups for s in g]
        self.ref = {s.key: nn.Parameter(_initial(s)) for s in self.all_specs}
        decayed = [p for p in self.ref.values() if p.dim() >= 2]
        plain = [p for p in self.ref.values() if p.dim() < 2]
        self.ref_opt = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": CONFIG.weight_decay},
             {"params": plain, "weight_decay": 0.0}],
            lr=LRS[0], betas=(CONFIG.beta1, CONFIG.beta2), eps=CONFIG.eps, foreach=False)
        self.mine = {s.key: nn.Parameter(_initial(s)) for s in self.all_specs
                     if rank in s.members}
        self.param_groups = [
            ParamGroup([self.mine[s.key] for s in g], pgs[g[0].members], [s.key for s in g])
            for g in groups if rank in g[0].members]
        self.zero = Zero1Optimizer(self.param_groups, norm_group=dist.group.WORLD,
                                   config=CONFIG, max_grad_norm=MAX_NORM,
                                   bucket_numel=BUCKET_NUMEL)

    def step(self, step: int) -> tuple[float, float]:
        """One step of both; returns (sharded norm, reference norm)."""
        for s in self.all_specs:
            contributions = [_rank_grad(s, step, r) for r in s.members
                             if (step, s.key, r) not in self.skip_grad]
            self.ref[s.key].grad = torch.stack(contributions).sum(0)
            if s.key in self.mine:
                self.mine[s.key].grad = (None if (step, s.key, self.rank) in self.skip_grad
                                         else _rank_grad(s, step, self.rank))
        ref_norm = torch.nn.utils.clip_grad_norm_(list(self.ref.values()), MAX_NORM)
        for g in self.ref_opt.param_groups:
            g["lr"] = LRS[step]
        self.ref_opt.step()
        norm = self.zero.step(LRS[step])
        self.zero.zero_grad()
        return float(norm), float(ref_norm)

    def check(self, norm: float, ref_norm: float, what: str) -> None:
        assert abs(norm - ref_norm) <= RTOL * ref_norm, \
            f"{what}: grad norm {norm} != reference {ref_norm}"
        for key, param in self.mine.items():
            ref = self.ref[key].detach()
            worst = ((param.detach() - ref).abs() / ref.abs().clamp(min=1.0)).max().item()
            assert worst <= RTOL, f"{what}: param {key} off by {worst:.3g} (relative)"

    def unsharded_state_bytes(self, keys) -> int:
        return sum(t.numel() * t.element_size() for p in (self.ref[k] for k in keys)
                   for name, t in self.ref_opt.state[p].items() if name != "step")


def _scenario_one_world_group(rank: int, pgs: dict) -> None:
    # rank 1 has no gradient for the bias at step 2: None must count as zeros.
    run = Run(rank, _one_world_group(), pgs, skip_grad=frozenset({(2, "w1", 1)}))
    buckets = run.zero.groups[0].buckets
    assert [len(b.slots) for b in buckets] == [1, 1, 1, 1, 3], "bucket packing changed"
    assert len(buckets) >= 2
    saved = None
    for step in range(len(LRS)):
        if step == len(LRS) - 1:
            saved = ({k: p.detach().clone() for k, p in run.mine.items()},
                     copy.deepcopy(run.zero.full_state()), run.zero.step_count)
        run.check(*run.step(step), what=f"one world group, step {step + 1}")
        assert run.ref_opt.state[run.ref["w0"]]["step"].item() == run.zero.step_count

    # Per-rank state is 1/4 of the unsharded AdamW state, up to padding.
    unsharded = run.unsharded_state_bytes(run.mine)
    padding_bound = 2 * 4 * len(buckets)
    assert 0 <= run.zero.state_bytes() - unsharded / WORLD < padding_bound, \
        (run.zero.state_bytes(), unsharded)

    # checkpoint round trip (the layout-free moments checkpoints store): a fresh optimizer
    # loaded with the state before the last step redoes that step to the same bits.
    params_before, state_before, step_before = saved
    restored = {k: nn.Parameter(v.clone()) for k, v in params_before.items()}
    keys = [s.key for s in run.groups[0]]
    again = Zero1Optimizer([ParamGroup([restored[k] for k in keys], pgs[(0, 1, 2, 3)], keys)],
                           norm_group=dist.group.WORLD, config=CONFIG,
                           max_grad_norm=MAX_NORM, bucket_numel=BUCKET_NUMEL)
    again.load_full_state(state_before, step_before)
    last = len(LRS) - 1
    for s in run.groups[0]:
        restored[s.key].grad = (None if (last, s.key, rank) in run.skip_grad
                                else _rank_grad(s, last, rank))
    again.step(LRS[last])
    for key, param in restored.items():
        assert torch.equal(param, run.mine[key]), f"full_state round trip differs for {key}"

    # The dropped bucket: skipping one reduce-scatter must make the comparison fail.
    dropped = Run(rank, _one_world_group(), pgs)
    original = dropped.zero._reduce_scatter_bucket

    def skip_bucket_1(group, bucket):
        if bucket.index != 1:
            return original(group, bucket)
        flat = torch.zeros(bucket.padded_numel)
        for slot in bucket.slots:
            flat[slot.offset:slot.end] = group.params[slot.index].grad.reshape(-1)
        start, end = bucket.shard_range(group.rank)
        return flat[start:end].clone()  # this rank's own gradient, never summed

    dropped.zero._reduce_scatter_bucket = skip_bucket_1
    with pytest.raises(AssertionError):
        for step in range(len(LRS)):
            dropped.check(*dropped.step(step), what="dropped bucket")


def _scenario_dense_expert_local(rank: int, pgs: dict) -> None:
    run = Run(rank, _dense_expert_local(), pgs)
    sizes = [g.size for g in run.zero.groups]
    assert sizes == [4, 2, 1], sizes
    for step in range(len(LRS)):
        run.check(*run.step(step), what=f"dense/expert/local, step {step + 1}")
    expected = sum(run.unsharded_state_bytes([p for p in run.mine if p.startswith(prefix)])
                   / size for prefix, size in (("dense", 4), ("e", 2), ("local", 1)))
    n_buckets = sum(len(g.buckets) for g in run.zero.groups)
    assert 0 <= run.zero.state_bytes() - expected < 2 * 4 * n_buckets


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


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        pgs = {(0, 1, 2, 3): dist.group.WORLD, (0, 2): dist.new_group([0, 2]),
               (1, 3): dist.new_group([1, 3])}
        pgs.update({(r,): None for r in range(WORLD)})
        _scenario_one_world_group(rank, pgs)
        _scenario_dense_expert_local(rank, pgs)
        _scenario_layout_mismatch(rank, pgs)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # four gloo ranks
def test_zero1_matches_unsharded_adamw_on_4_gloo_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "store"),), nprocs=WORLD, join=True)


# ---------------------------------------------------------------- single process


def test_world_of_one_matches_torch_adamw():
    torch.set_num_threads(1)
    specs = [Spec(f"w{i}", s, (0,)) for i, s in enumerate(SHAPES)]
    run_params = [nn.Parameter(_initial(s)) for s in specs]
    ref_params = [nn.Parameter(_initial(s)) for s in specs]
    zero = Zero1Optimizer([(run_params, None)], norm_group=None, config=CONFIG,
                          max_grad_norm=MAX_NORM, bucket_numel=BUCKET_NUMEL)
    ref_opt = torch.optim.AdamW(
        [{"params": [p for p in ref_params if p.dim() >= 2], "weight_decay": CONFIG.weight_decay},
         {"params": [p for p in ref_params if p.dim() < 2], "weight_decay": 0.0}],
        lr=LRS[0], betas=(CONFIG.beta1, CONFIG.beta2), eps=CONFIG.eps, foreach=False)
    for step, lr in enumerate(LRS):
        for s, p, r in zip(specs, run_params, ref_params):
            p.grad = _rank_grad(s, step, 0)
            r.grad = p.grad.clone()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, MAX_NORM)
        for g in ref_opt.param_groups:
            g["lr"] = lr
        ref_opt.step()
        norm = zero.step(lr)
        torch.testing.assert_close(norm, ref_norm, rtol=RTOL, atol=0.0)
        for p, r in zip(run_params, ref_params):
            torch.testing.assert_close(p, r, rtol=RTOL, atol=RTOL)
    assert zero.state_bytes() == sum(t.numel() * 4 for p in ref_params
                                     for k, t in ref_opt.state[p].items() if k != "step")
    zero.zero_grad()
    assert all(p.grad is None for p in run_params)


def test_plan_buckets_covers_every_element_once_per_rank_shards():
    shapes = [(7, 5), (13,), (3, 4, 5), (10, 11), (1,), (9,), (2, 3)]
    names = [f"p{i}" for i in range(len(shapes))]
    decays = [len(s) >= 2 for s in shapes]
    for group_size in (1, 2, 3, 4):
        buckets = plan_buckets(shapes, names, decays, bucket_numel=40, group_size=group_size)
        slots = [slot for b in buckets for slot in b.slots]
        assert [s.index for s in slots] == list(range(len(shapes)))
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


def test_invalid_params_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="fp32"):
        Zero1Optimizer([([nn.Parameter(torch.zeros(3, dtype=torch.float64))], None)],
                       norm_group=None)
    with pytest.raises(ValueError, match="does not require grad"):
        Zero1Optimizer([([nn.Parameter(torch.zeros(3), requires_grad=False)], None)],
                       norm_group=None)
    shared = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="exactly one group once"):
        Zero1Optimizer([([shared], None), ([shared], None)], norm_group=None)
    with pytest.raises(ValueError, match="bucket_numel"):
        Zero1Optimizer([([nn.Parameter(torch.zeros(3))], None)], norm_group=None,
                       bucket_numel=0)
    assert decay_matrices_only("w", torch.zeros(2, 2)) and not decay_matrices_only("b",
                                                                                  torch.zeros(2))
