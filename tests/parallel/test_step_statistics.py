"""The step's model statistics: sums and maxima of every layer in one all-reduce, exact.

Three gloo ranks (so a slot layout that only works for two would fail) each hold integer
loads of two MoE layers and per-head maxima of two attention layers (negative values, a
-inf head that saw no token on one rank, equal values on two ranks); every rank gets the
exact sum and the exact max of all ranks' values, bitwise, in the inputs' dtypes, from
exactly one all-reduce. One process (no group) returns its own values unchanged.
"""
from __future__ import annotations

import os
import tempfile
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.step_statistics import reduce_step_statistics

RANKS = 3


def _inputs(rank: int) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(rank)
    sums = {"layers.1.ffn": torch.randint(0, 1000, (16,), generator=gen).double(),
            "layers.2.ffn": torch.randint(0, 10**9, (5,), generator=gen).double()}
    maxima = {"layers.0.attn": torch.randn(4, generator=gen) * 50 - 10,
              "layers.1.attn": torch.randn(3, generator=gen).float()}
    maxima["layers.0.attn"][1] = 7.25  # a tie between ranks
    if rank == 1:
        maxima["layers.1.attn"][0] = float("-inf")
    return sums, maxima


def _worker(rank: int, init_file: str, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=RANKS)
    try:
        calls = []
        real = dist.all_reduce
        with mock.patch("torch.distributed.all_reduce",
                        lambda *a, **k: calls.append(1) or real(*a, **k)):
            sums, maxima = reduce_step_statistics(*_inputs(rank), dist.group.WORLD)
        torch.save({"sums": sums, "maxima": maxima, "calls": len(calls)}, f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_one_all_reduce_gives_exact_sums_and_maxima_on_every_rank():
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "out")
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), result), nprocs=RANKS, join=True)
        got = [torch.load(f"{result}.{rank}") for rank in range(RANKS)]
    inputs = [_inputs(rank) for rank in range(RANKS)]
    for rank, out in enumerate(got):
        assert out["calls"] == 1, f"rank {rank}: {out['calls']} all-reduces"
        for name in inputs[0][0]:
            want = torch.stack([s[name] for s, _ in inputs]).sum(0)
            assert out["sums"][name].dtype == want.dtype and torch.equal(out["sums"][name], want)
        for name in inputs[0][1]:
            want = torch.stack([m[name] for _, m in inputs]).amax(0)
            assert out["maxima"][name].dtype == torch.float32
            assert torch.equal(out["maxima"][name], want), (rank, name, out["maxima"][name], want)


def test_one_process_returns_its_own_values():
    sums, maxima = _inputs(0)
    got_sums, got_maxima = reduce_step_statistics(sums, maxima, None)
    for name in sums:
        assert torch.equal(got_sums[name], sums[name])
    for name in maxima:
        assert torch.equal(got_maxima[name], maxima[name])
    assert reduce_step_statistics({}, {}, None) == ({}, {})
