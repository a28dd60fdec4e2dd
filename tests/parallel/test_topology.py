"""The process groups: Megatron-Core's rank layout, built without importing megatron.core.

`rank_groups` must give, for every layout, exactly the groups megatron-core's
`initialize_model_parallel` builds (its `RankGenerator`s with order "tp-cp-ep-dp-pp",
TP = CP = 1, expert TP = 1): checked against megatron itself. Then four gloo ranks build a
`Topology` (pp=2 dp=2 ep=2, DEP groups of one replica) and each rank's groups, coordinates
and DEP members are the ones that arithmetic names; destroy() releases the groups so the
same process can build the next layout.
"""
from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.topology import ParallelSizes, Topology, rank_groups

LAYOUTS = [(pp, dp, ep) for pp in (1, 2, 3, 16) for dp in (1, 2, 4, 6, 16)
           for ep in (1, 2, 4, 16) if dp % ep == 0]


def megatron_groups(pp: int, dp: int, ep: int) -> dict[str, list[list[int]]]:
    with warnings.catch_warnings():  # megatron warns that TE/Apex are absent on CPU
        warnings.simplefilter("ignore")
        from megatron.core.parallel_state import RankGenerator
    order = "tp-cp-ep-dp-pp"  # initialize_model_parallel's default
    dense = RankGenerator(tp=1, ep=1, dp=dp, pp=pp, cp=1, order=order)
    expert = RankGenerator(tp=1, ep=ep, dp=dp // ep, pp=pp, cp=1, order=order)
    return {"pp": dense.get_ranks("pp"), "dp": dense.get_ranks("dp"),
            "ep": expert.get_ranks("ep"), "edp": expert.get_ranks("dp")}


@pytest.mark.parametrize("pp,dp,ep", LAYOUTS)
def test_rank_groups_are_megatron_cores(pp, dp, ep):
    ours = rank_groups(ParallelSizes(pp=pp, dp=dp, ep=ep))
    assert ours == megatron_groups(pp, dp, ep)


def _worker(rank: int, init_file: str, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=4)
    try:
        seen = []
        for dep_group_replicas in (1, 0):  # a second Topology after destroy(): groups rebuilt
            topo = Topology(ParallelSizes(pp=2, dp=2, ep=2), dep_group_replicas=dep_group_replicas)
            groups = {kind: dist.get_process_group_ranks(getattr(topo, f"{kind}_group"))
                      for kind in ("pp", "dp", "ep", "edp", "ep_meta", "dep")}
            seen.append({"groups": groups, "coords": (topo.pp_rank, topo.dp_rank, topo.ep_rank,
                                                      topo.edp_rank),
                         "dep_stage0_ranks": topo.dep_stage0_ranks})
            dist.all_reduce(torch.ones(1), group=topo.dep_group)  # the groups work
            topo.destroy()
        torch.save(seen, f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_four_ranks_build_the_groups_rank_groups_names():
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "out")
        mp.spawn(_worker, args=(os.path.join(tmp, "store"), result), nprocs=4, join=True)
        got = [torch.load(f"{result}.{rank}") for rank in range(4)]
    expected = rank_groups(ParallelSizes(pp=2, dp=2, ep=2))
    for rank, (per_replica, whole) in enumerate(got):
        for kind in ("pp", "dp", "ep", "edp"):
            assert per_replica["groups"][kind] == next(g for g in expected[kind] if rank in g)
        assert per_replica["groups"]["ep_meta"] == per_replica["groups"]["ep"]
        assert per_replica["coords"] == (rank // 2, rank % 2, rank % 2, 0)
        # rank = dp_rank + dp * pp_rank: replica r is ranks {r, r + 2}; one replica per DEP group
        assert per_replica["groups"]["dep"] == [rank % 2, rank % 2 + 2]
        assert per_replica["dep_stage0_ranks"] == [0]
        assert whole["groups"]["dep"] == [0, 1, 2, 3] and whole["dep_stage0_ranks"] == [0, 1]
