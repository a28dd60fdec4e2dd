"""Muon on ZeRO-1 against torch.optim.Muon, and sharded (matrices straddling shards)
against unsharded.

Single process: a world-of-one ZeRO-1 with the Muon rule equals `torch.optim.Muon`
(nesterov, ``adjust_lr_fn="match_rms_adamw"``, Newton-Schulz in bf16 as torch does) fed
the same gradients; a grouped 3-D expert parameter [E, out, in] equals E separate 2-D
parameters in torch's Muon. Two gloo ranks with small buckets cut matrices (and the
expert batch) across the shard boundary; their parameters equal the world-of-one run.
"""
from __future__ import annotations

import os
import tempfile
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from parallel.muon import Muon, MuonConfig, newton_schulz
from parallel.zero1 import ParamGroup, Zero1Optimizer

LRS = (2e-2, 1e-2, 5e-3)
WEIGHT_DECAY = 0.1
# wide, tall, square, two of one shape (one batch), a 1 x n row vector matrix
SHAPES = [(6, 10), (12, 5), (7, 7), (6, 10), (1, 9)]
EXPERTS = (3, 4, 6)  # a grouped expert parameter: 3 matrices of 4 x 6


def _gen(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def _init(key: str, shape) -> torch.Tensor:
    return torch.randn(shape, generator=_gen("init/" + key))


def _grad(key: str, shape, step: int) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(f"grad/{key}/{step}"))


def _zero1_run(shapes, config: MuonConfig, *, group=None, bucket_numel=10_000,
               steps=len(LRS)) -> tuple[list[nn.Parameter], Zero1Optimizer]:
    params = [nn.Parameter(_init(f"w{i}", s)) for i, s in enumerate(shapes)]
    zero = Zero1Optimizer([ParamGroup(params, group, [f"w{i}" for i in range(len(params))],
                                      rule=Muon(config))],
                          norm_group=group, max_grad_norm=0.0, bucket_numel=bucket_numel)
    for step in range(steps):
        for i, (p, s) in enumerate(zip(params, shapes)):
            (p * _grad(f"w{i}", s, step)).sum().backward()
        zero.step(LRS[step])
        zero.zero_grad()
    return params, zero


def _torch_muon(matrices: dict[str, tuple[int, int]], grads) -> dict[str, torch.Tensor]:
    params = {k: nn.Parameter(_init(k, s)) for k, s in matrices.items()}
    opt = torch.optim.Muon(list(params.values()), lr=LRS[0], weight_decay=WEIGHT_DECAY,
                           momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    for step in range(len(LRS)):
        for k, p in params.items():
            p.grad = grads(k, step)
        for g in opt.param_groups:
            g["lr"] = LRS[step]
        opt.step()
    return {k: p.detach() for k, p in params.items()}


def test_world_of_one_equals_torch_muon_in_bf16():
    torch.set_num_threads(1)
    config = MuonConfig(weight_decay=WEIGHT_DECAY, ns_dtype=torch.bfloat16)
    params, zero = _zero1_run(SHAPES, config)
    reference = _torch_muon({f"w{i}": s for i, s in enumerate(SHAPES)},
                            lambda k, step: _grad(k, dict(enumerate(SHAPES))[int(k[1:])], step))
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), reference[f"w{i}"], rtol=0, atol=1e-6,
                                   msg=lambda m: f"w{i}: {m}")
        assert not torch.equal(p.detach(), _init(f"w{i}", SHAPES[i])), "nothing moved"
    assert zero.state_bytes() == 4 * sum(p.numel() for p in params), "momentum only"


def test_grouped_experts_are_one_matrix_each():
    torch.set_num_threads(1)
    config = MuonConfig(weight_decay=WEIGHT_DECAY, ns_dtype=torch.bfloat16)
    (grouped,), _ = _zero1_run([EXPERTS], config)
    E, M, N = EXPERTS
    # torch's Muon, one 2-D parameter per expert, initialised and fed the same slices
    params = [nn.Parameter(_init("w0", EXPERTS)[e].clone()) for e in range(E)]
    opt = torch.optim.Muon(params, lr=LRS[0], weight_decay=WEIGHT_DECAY,
                           adjust_lr_fn="match_rms_adamw")
    for step in range(len(LRS)):
        for e, p in enumerate(params):
            p.grad = _grad("w0", EXPERTS, step)[e].clone()
        for g in opt.param_groups:
            g["lr"] = LRS[step]
        opt.step()
    torch.testing.assert_close(grouped.detach(), torch.stack([p.detach() for p in params]),
                               rtol=0, atol=1e-6)


def test_newton_schulz_orthogonalises_and_batches_independently():
    torch.set_num_threads(1)
    config = MuonConfig()
    u = torch.randn(3, 8, 5, generator=_gen("ns"))
    o = newton_schulz(u, config, torch.float32)
    singular = torch.linalg.svdvals(o)
    assert singular.min() > 0.5 and singular.max() < 1.3, singular  # Muon's ~U S' V^T
    alone = newton_schulz(u[1:2], config, torch.float32)
    torch.testing.assert_close(o[1:2], alone, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="give parameters"):
        Zero1Optimizer([ParamGroup([nn.Parameter(torch.zeros(4))], None, ["bias"],
                                   rule=Muon())], norm_group=None)


# ---------------------------------------------------------------- two gloo ranks

# Buckets of <= 150 elements over 2 ranks (shards of 55, 71 and 42 elements):
# [w0 60 | w1 49] cuts w0; [w2 60 | w3 (experts) 72 | w4 9] cuts expert 0 of w3 after
# 11 elements; [w5 84] is cut in half.
STRADDLE = [(6, 10), (7, 7), (12, 5), EXPERTS, (1, 9), (12, 7)]


def _straddle_worker(rank: int, init_file: str, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=2)
    try:
        config = MuonConfig(weight_decay=WEIGHT_DECAY)
        params, zero = _zero1_run(STRADDLE, config, group=dist.group.WORLD, bucket_numel=150)
        cut = [piece.slot.name for shard in zero.groups[0].shards for piece in shard.pieces
               if piece.numel < piece.slot.numel]
        if rank == 0:
            torch.save({"params": [p.detach().clone() for p in params], "cut": cut}, result)
    finally:
        dist.destroy_process_group()


def _sharded(tmp: str) -> dict:
    result = os.path.join(tmp, "sharded.pt")
    mp.spawn(_straddle_worker, args=(os.path.join(tmp, "store"), result), nprocs=2, join=True)
    return torch.load(result)


@pytest.mark.slow
def test_two_ranks_with_straddling_matrices_equal_one_process():
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        sharded = _sharded(tmp)
    assert sharded["cut"] == ["w0", "w3", "w5"], sharded["cut"]
    reference, _ = _zero1_run(STRADDLE, MuonConfig(weight_decay=WEIGHT_DECAY),
                              bucket_numel=150)
    for i, (p, ref) in enumerate(zip(sharded["params"], reference)):
        torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-6,
                                   msg=lambda m: f"w{i}: {m}")
