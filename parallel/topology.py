"""Who is who in a job: the parallel sizes, this rank's coordinates and every process group.

World = PP x DP (TP = 1). Ranks are laid out as Megatron-Core does with the
order "tp-cp-ep-dp-pp": pipeline stages are the outermost blocks, and expert
parallel groups are carved out of the data-parallel ranks of one stage.
Example, 8 ranks, pp=2 dp=4 ep=2:

    stage 0: ranks 0 1 2 3      dp group {0,1,2,3}   ep groups {0,1} {2,3}   expert-dp {0,2} {1,3}
    stage 1: ranks 4 5 6 7      dp group {4,5,6,7}   ep groups {4,5} {6,7}   expert-dp {4,6} {5,7}
    pipelines: {0,4} {1,5} {2,6} {3,7}
    DEP groups (dep_group_replicas=2): replicas {0,1} -> ranks {0,1,4,5}; {2,3} -> {2,3,6,7}

A DEP group is a run of consecutive DP replicas with all their pipeline stages: one DEP
plan balances the media of those replicas over those ranks. Each rank derives that
plan from its loader's view of the group's rows, so the group size bounds the
planning work per rank; covering every replica (the default for dp <= 8) is the
report's DEP over all GPUs.

The ranks of each group are megatron-core's (`rank_groups` computes them as its
`RankGenerator` does for TP = CP = 1; tests/parallel/test_topology.py checks them against it
for many layouts); the groups are built here and exposed only through this object: nothing
else in the code base creates groups or reads global parallel state. Why not
`parallel_state.initialize_model_parallel` itself: importing `megatron.core` compiles its
fusions with torch.compile at import time, 4-10 s per rank before the first step, and it
builds a dozen groups this job never uses. `check_layout` refuses a layout that cannot run,
before anything is allocated.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from parallel.layout import LayoutError


def init_distributed(backend: str = "gloo", timeout_s: float = 1800.0):
    """Join the job's default process group from torchrun's environment; return its store
    (None when the group already exists: the first caller gets it).

    The store is prefixed with torchrun's restart count: after a restart
    (`--max-restarts`) the agent's store still holds the previous attempt's keys,
    and gloo would read a dead peer's address from them and fail to connect.
    `timeout_s` bounds every collective (a frozen peer makes it raise instead of
    waiting forever); the groups built later by `Topology` get the same bound.
    """
    if dist.is_initialized():
        return None
    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    agent_hosts_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world,
                          is_master=not agent_hosts_store and rank == 0,
                          timeout=timedelta(minutes=10), multi_tenant=not agent_hosts_store)
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = dist.PrefixStore(f"k25/attempt_{attempt}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return prefixed


@dataclass(frozen=True)
class ParallelSizes:
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    dp: int = 1

    @property
    def world(self) -> int:
        return self.pp * self.dp

    @property
    def stages(self) -> int:
        return self.pp * self.vpp


def check_layout(sizes: ParallelSizes, *, num_experts: int, microbatches: int,
                 world_size: int | None = None) -> None:
    """Refuse every size combination that cannot run, naming the setting to change.

    Which layers go where is parallel/layout.py's to check (`resolve_layout`)."""
    for name in ("pp", "vpp", "ep", "dp"):
        if getattr(sizes, name) < 1:
            raise LayoutError(f"parallel.{name} must be >= 1")
    if world_size is not None and world_size != sizes.world:
        raise LayoutError(
            f"the job has {world_size} ranks but parallel.pp x parallel.dp = {sizes.pp} x "
            f"{sizes.dp} = {sizes.world}: launch {sizes.world} ranks or change pp/dp")
    if num_experts % sizes.ep:
        raise LayoutError(
            f"model.lm.num_experts={num_experts} do not split over parallel.ep={sizes.ep}: "
            "choose an ep that divides the number of experts")
    if sizes.dp % sizes.ep:
        raise LayoutError(
            f"parallel.ep={sizes.ep} must divide parallel.dp={sizes.dp}: expert-parallel groups "
            "are carved out of the data-parallel ranks of one pipeline stage")
    if sizes.pp > 1 and sizes.vpp > 1 and (microbatches < sizes.pp or microbatches % sizes.pp):
        raise LayoutError(
            f"interleaved 1F1B needs the microbatches per replica ({microbatches} = "
            "train.global_batch / (parallel.dp x train.micro_batch)) to be a positive multiple "
            f"of parallel.pp={sizes.pp}: change train.global_batch or train.micro_batch")
    if sizes.pp == 1 and sizes.vpp > 1:
        raise LayoutError("parallel.vpp > 1 needs parallel.pp > 1 (virtual stages interleave "
                          "over pipeline ranks)")


def rank_groups(sizes: ParallelSizes) -> dict[str, list[list[int]]]:
    """The global ranks of every group of each kind, in Megatron-Core's order "tp-cp-ep-dp-pp"
    with TP = CP = 1: rank = dp_rank + dp * pp_rank, and within a stage the expert-parallel
    groups are runs of `ep` consecutive data-parallel ranks, the expert-data-parallel groups
    the ranks `ep` apart."""
    pp, dp, ep = sizes.pp, sizes.dp, sizes.ep
    return {
        "pp": [[d + dp * p for p in range(pp)] for d in range(dp)],
        "dp": [[d + dp * p for d in range(dp)] for p in range(pp)],
        "ep": [[dp * p + ep * g + e for e in range(ep)] for p in range(pp) for g in range(dp // ep)],
        "edp": [[dp * p + e + ep * g for g in range(dp // ep)] for p in range(pp) for e in range(ep)],
    }


class Topology:
    """Sizes, this rank's coordinates and the process groups of the job."""

    def __init__(self, sizes: ParallelSizes, timeout_s: float = 1800.0, dep_group_replicas: int = 0):
        """`timeout_s` bounds every collective of the groups built here (as init_distributed's);
        `dep_group_replicas`: DP replicas per DEP group (0: all)."""
        if not dist.is_initialized():
            raise RuntimeError("Topology needs torch.distributed initialised (torchrun sets it up)")
        if dist.get_world_size() != sizes.world:
            raise LayoutError(f"world size {dist.get_world_size()} != pp x dp = {sizes.world}")
        self.sizes = sizes
        self.rank = dist.get_rank()
        timeout = timedelta(seconds=timeout_s)
        self._groups = []  # built here, destroyed by destroy()
        for kind, ranks in rank_groups(sizes).items():  # every rank builds every group, in order
            group, _ = dist.new_subgroups_by_enumeration(ranks, timeout=timeout)
            setattr(self, f"{kind}_group", group)
            self._groups.append(group)
        self.world_group = dist.group.WORLD
        self.pp_rank = dist.get_rank(self.pp_group)
        self.dp_rank = dist.get_rank(self.dp_group)
        self.ep_rank = dist.get_rank(self.ep_group)
        self.edp_rank = dist.get_rank(self.edp_group)
        # global ranks of this rank's pipeline, indexed by pipeline rank
        self.pipeline_ranks = dist.get_process_group_ranks(self.pp_group)
        # global rank of pipeline stage 0 of each data-parallel replica (DEP sends media there)
        self.stage0_rank_of_replica = list(range(sizes.dp))
        # DEP group: `dep_group_replicas` consecutive replicas (0 or more than dp: all of them)
        k = sizes.dp if dep_group_replicas <= 0 else min(dep_group_replicas, sizes.dp)
        first = self.dp_rank // k * k
        self.dep_replicas = list(range(first, min(first + k, sizes.dp)))
        members = list(range(sizes.world))
        self.dep_group = self.world_group
        if k < sizes.dp:
            for start in range(0, sizes.dp, k):  # every rank creates every group, in order
                ranks = [i for i in range(sizes.world) if start <= i % sizes.dp < start + k]
                group = dist.new_group(ranks, timeout=timeout)
                if start == first:
                    self.dep_group, members = group, ranks
                    self._groups.append(group)
        # rank within the DEP group of stage 0 of each of its replicas (DEP plans in group ranks)
        self.dep_stage0_ranks = [members.index(self.stage0_rank_of_replica[r]) for r in self.dep_replicas]
        # the expert-parallel ranks again, on another communicator: the per-expert counts
        # travel there, so they never queue behind a token all-to-all still in flight
        self.ep_meta_group = self.ep_group
        if sizes.ep > 1:
            self.ep_meta_group, _ = dist.new_subgroups_by_enumeration(rank_groups(sizes)["ep"],
                                                                      timeout=timeout)
            self._groups.append(self.ep_meta_group)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    def stages_of_rank(self) -> list[int]:
        """Global chunk (virtual stage) indices held here: pp_rank, pp_rank + pp, ..."""
        return [c * self.sizes.pp + self.pp_rank for c in range(self.sizes.vpp)]

    def stage_rank(self, stage: int) -> int:
        """Global rank (within this pipeline) that holds chunk `stage`."""
        return self.pipeline_ranks[stage % self.sizes.pp]

    def local_experts(self, num_experts: int) -> range:
        per_rank = num_experts // self.sizes.ep
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    def describe(self) -> str:
        return (f"rank {self.rank}: pp_rank {self.pp_rank} dp_rank {self.dp_rank} "
                f"ep_rank {self.ep_rank} edp_rank {self.edp_rank} stages {self.stages_of_rank()}")

    def destroy(self) -> None:
        """Release this topology's groups (a process may build another, e.g. in tests)."""
        for group in self._groups:
            dist.destroy_process_group(group)
        self._groups = []
