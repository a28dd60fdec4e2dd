"""One optimizer step of the model spread over PP x DP ranks, with EP inside each stage.

    ┌ trainer: this replica's microbatches, lr ──────────────────────────────────────────┐
    │ 1. global count of labelled tokens (all_reduce over the DP group)                  │
    │ 2. pipeline schedule (interleaved 1F1B) over this rank's chunks; MoE layers talk   │
    │    to their experts through the all-to-all dispatcher of the EP group             │
    │ 3. ZeRO-1 step: dense grads reduce-scattered over DP, expert grads over expert-DP,│
    │    one global grad norm over the world, AdamW on the shards, params all-gathered  │
    │ 4. router balancing: expert load summed over DP, same bias update on every copy   │
    └────────────────────────────────────────────────────────────────────────────────────┘

Each rank builds only its own chunks (what `layout` puts in every stage it holds:
parallel/layout.py) and only its experts; parameters are initialised by name, so they
equal the single-process model's. With `encoder = "colocated"` the vision
encoder lives in stage 0 and its gradients are reduced over the DP group like
the rest of stage 0.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from model.config import ModelConfig
from model.init import initialize
from model.inputs import ModelInputs
from model.lm import LanguageModelChunk
from model.loss import IGNORE_INDEX, cross_entropy_sum
from model.vision_language import VisionEncoder
from parallel.adamw import AdamWConfig
from parallel.dep import DecoupledEncoder, StepMedia
from parallel.expert_dispatch import AllToAllDispatcher
from parallel.layout import PipelineLayout
from parallel.pipeline_runtime import PipelineRuntime
from parallel.schedule import COMPUTE_OPS, schedule
from parallel.topology import Topology
from parallel.zero1 import ParamGroup, Zero1Optimizer


class StageModule(nn.Module):
    """One pipeline chunk; on stage 0 (colocated mode) also the vision encoder.

    Attribute names match `VisionLanguageModel` (`lm`, `vision`), so parameter
    names are the single-process model's.
    """

    def __init__(self, lm: LanguageModelChunk, vision: VisionEncoder | None):
        super().__init__()
        self.lm = lm
        self.vision = vision

    def forward(self, x: torch.Tensor, inputs: ModelInputs,
                media_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`media_embeds` (DEP) replace the encoder; colocated stage 0 runs its own encoder."""
        if media_embeds is None and self.vision is not None and inputs.grid_thw:
            media_embeds = self.vision(inputs.patches, inputs.grid_thw)
        return self.lm(x, inputs.position_ids, inputs.doc_ids, media_embeds, inputs.media_index)


def is_expert_param(name: str) -> bool:
    return ".experts." in name


def stage_module(model_cfg: ModelConfig, layout: PipelineLayout, stage: int,
                 local_experts: range, encoder: str) -> StageModule:
    """Chunk `stage` of `layout` with these experts, and the encoder on a colocated stage 0
    (not initialised: the engine initialises by name, the planner builds it on `meta`)."""
    lm = LanguageModelChunk(model_cfg.lm, layout.chunks[stage], local_experts)
    return StageModule(lm, VisionEncoder(model_cfg) if stage == 0 and encoder == "colocated"
                       else None)


def zero1_param_groups(stages: dict[int, StageModule], dep_encoder: VisionEncoder | None
                       ) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The parameters ZeRO-1 shards together, by group, in optimizer order: "dense" over the
    data-parallel group, "expert" over the expert-data-parallel group, "encoder" (DEP's
    replicated encoder) over the world. Empty groups are left out (every rank of a group
    holds the same stages, so all its members leave it out)."""
    named = [(n, p) for m in stages.values() for n, p in m.named_parameters()]
    groups = {"dense": [(n, p) for n, p in named if not is_expert_param(n)],
              "expert": [(n, p) for n, p in named if is_expert_param(n)],
              "encoder": ([(f"vision.{n}", p) for n, p in dep_encoder.named_parameters()]
                          if dep_encoder is not None else [])}
    return {kind: params for kind, params in groups.items() if params}


class ParallelEngine:
    def __init__(self, model_cfg: ModelConfig, topology: Topology, layout: PipelineLayout, *,
                 micro_batch: int, seq_len: int, microbatches: int, seed: int,
                 adamw: AdamWConfig, grad_clip: float, encoder: str = "colocated"):
        if encoder not in ("colocated", "dep"):
            raise ValueError(f"encoder={encoder!r}: choose 'dep' or 'colocated'")
        self.cfg, self.topo = model_cfg, topology
        sizes = topology.sizes
        self.microbatches = microbatches
        if len(layout.chunks) != sizes.stages:
            raise ValueError(f"layout has {len(layout.chunks)} chunks for {sizes.stages} stages")
        self.layout = layout
        local_experts = topology.local_experts(model_cfg.lm.num_experts)
        self.stages: dict[int, StageModule] = {}
        for stage in topology.stages_of_rank():
            module = stage_module(model_cfg, layout, stage, local_experts, encoder)
            for moe in module.lm.moe_layers():
                moe.dispatcher = AllToAllDispatcher(topology.ep_group, model_cfg.lm.num_experts)
            initialize(module, seed, model_cfg.lm.init_std)
            self.stages[stage] = module
        self.dep: DecoupledEncoder | None = None
        if encoder == "dep":  # replicated on every rank, outside the pipeline
            vision = VisionEncoder(model_cfg)
            initialize(vision, seed, model_cfg.lm.init_std, prefix="vision")
            self.dep = DecoupledEncoder(vision, topology.dep_group, topology.dep_stage0_ranks)
        process_groups = {"dense": topology.dp_group, "expert": topology.edp_group,
                          "encoder": topology.world_group}
        groups = [ParamGroup([p for _, p in params], process_groups[kind], [n for n, _ in params])
                  for kind, params in zero1_param_groups(
                      self.stages, self.dep.encoder if self.dep else None).items()]
        self.optimizer = Zero1Optimizer(groups, norm_group=topology.world_group, config=adamw,
                                        max_grad_norm=grad_clip)
        actions = schedule(sizes.pp, sizes.vpp, microbatches)[topology.pp_rank]
        self.phases: list[tuple[str, str, float, float]] = []
        self.stats: dict[str, float] = {}  # last step's extra metrics (load balance, idle)
        self.runtime = PipelineRuntime(
            actions, num_stages=sizes.stages, microbatches=microbatches,
            stage_rank=topology.stage_rank,
            activation_shape=(micro_batch, seq_len, model_cfg.lm.hidden))

    def step(self, microbatches: list[ModelInputs], lr: float, media: StepMedia | None = None,
             media_ids: list[list[int]] | None = None) -> tuple[float, float]:
        """One optimizer step on this replica's microbatches; returns (global loss, grad norm).

        In DEP mode `media` describes the step's media of the DEP group (metadata, and a
        callback that fetches the pixels of the items this rank encodes) and
        `media_ids[mb]` the item ids of microbatch `mb` in placeholder order.
        """
        if len(microbatches) != self.microbatches:
            raise ValueError(f"expected {self.microbatches} microbatches, got {len(microbatches)}")
        count = torch.tensor(sum(int((m.labels != IGNORE_INDEX).sum()) for m in microbatches),
                             dtype=torch.float64)
        dist.all_reduce(count, group=self.topo.dp_group)
        self.stats["loss_tokens"] = float(count)
        count = max(float(count), 1.0)

        self.phases = []  # (name, category, start, end): work outside the schedule, for profiles
        clock = time.perf_counter
        start = clock()
        leaves = self.dep.forward(media) if self.dep is not None else {}
        if self.dep is not None:
            self.phases.append(("DEP plan + fetch + encode + send", "dep", start, clock()))
            self.stats.update(self.dep.stats)

        def forward(stage: int, x: torch.Tensor | None, mb: int) -> torch.Tensor:
            inputs = microbatches[mb]
            embeds = None
            if stage == 0 and self.dep is not None and media_ids[mb]:
                embeds = torch.cat([leaves[i] for i in media_ids[mb]])
            return self.stages[stage](inputs.tokens if x is None else x, inputs, embeds)

        def loss_fn(logits: torch.Tensor, mb: int) -> torch.Tensor:
            return cross_entropy_sum(logits, microbatches[mb].labels) / count

        loss = self.runtime.run(forward, loss_fn).double()
        if self.dep is not None:
            start = clock()
            self.dep.backward()
            self.phases.append(("DEP grads back + recompute + backward", "dep", start, clock()))
        start = clock()
        dist.all_reduce(loss, group=self.topo.world_group)  # only last stages contribute
        grad_norm = self.optimizer.step(lr)
        self.optimizer.zero_grad()
        self._update_router_biases()
        self.phases.append(("loss all-reduce + ZeRO-1 step + router bias", "optimizer", start,
                            clock()))
        self.stats["pipeline_idle_fraction"] = self._pipeline_idle_fraction()
        return float(loss), float(grad_norm)

    def _update_router_biases(self) -> None:
        balance = []
        for module in self.stages.values():
            for moe in module.lm.moe_layers():
                load = moe.expert_load.clone()
                dist.all_reduce(load, group=self.topo.dp_group)
                balance.append(float(load.max() / load.mean().clamp(min=1)))
                moe.update_bias(load)
        self.stats["expert_load_max_over_mean"] = max(balance) if balance else 1.0

    def _pipeline_idle_fraction(self) -> float:
        """This rank's idle share of its pipeline window (the bubble as this rank saw it)."""
        timeline = self.runtime.timeline
        window = timeline[-1].end - timeline[0].start
        compute = sum(r.end - r.start for r in timeline if r.action.op in COMPUTE_OPS)
        return (window - compute) / window if window > 0 else 0.0

    # ------------------------------------------------------------------ checkpoints

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.optimizer.full_state()

    def empty_optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {n: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                for g in self.optimizer.groups for bucket in g.buckets for slot in bucket.slots
                for n, p in [(slot.name, g.params[slot.index])]}

    def load_optimizer_state(self, state: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        self.optimizer.load_full_state(state, step)

    @property
    def optimizer_steps(self) -> int:
        return self.optimizer.step_count

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and router-bias buffers this rank holds, by their global names."""
        out = {}
        for module in self.stages.values():
            out.update({n: p.detach() for n, p in module.named_parameters()})
            out.update({n: b for n, b in module.named_buffers() if n.endswith("router.bias")})
        if self.dep is not None:
            out.update({f"vision.{n}": p.detach()
                        for n, p in self.dep.encoder.named_parameters()})
        return out
