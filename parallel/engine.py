"""One optimizer step of the model spread over PP x DP ranks, with EP inside each stage.

    ┌ trainer: this replica's microbatches, lr ──────────────────────────────────────────┐
    │ 1. global count of labelled tokens (all_reduce over the DP group)                  │
    │ 2. pipeline schedule (interleaved 1F1B) over this rank's chunks; MoE layers talk   │
    │    to their experts through the all-to-all dispatcher of the EP group             │
    │ 3. ZeRO-1: dense grads reduce-scattered over DP, expert grads over expert-DP,     │
    │    each bucket as soon as the chunk's last backward completes it (overlapped);   │
    │    one global grad norm over the world, the update rule on the fp32 shards,       │
    │    params all-gathered in the compute dtype (fp32 or bf16)                        │
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
from parallel.dep import DecoupledEncoder, ReplicaMedia
from parallel.expert_dispatch import AllToAllDispatcher
from parallel.layout import PipelineLayout
from parallel.muon import Muon, muon_param_groups
from parallel.pipeline_runtime import PipelineRuntime
from parallel.qk_clip import reduced_max_logits, track_max_logits
from parallel.schedule import COMPUTE_OPS, schedule
from parallel.topology import Topology
from parallel.update_rule import UpdateRule
from parallel.zero1 import DEFAULT_BUCKET_NUMEL, Zero1Optimizer


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


class ParallelEngine:
    def __init__(self, model_cfg: ModelConfig, topology: Topology, layout: PipelineLayout, *,
                 micro_batch: int, seq_len: int, microbatches: int, seed: int,
                 rule: UpdateRule, grad_clip: float, encoder: str = "colocated",
                 dtype: torch.dtype = torch.float32, bucket_numel: int = DEFAULT_BUCKET_NUMEL,
                 overlap_grad_reduce: bool = True, matrix_rule: Muon | None = None):
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
            lm = LanguageModelChunk(model_cfg.lm, layout.chunks[stage], local_experts)
            for moe in lm.moe_layers():
                moe.dispatcher = AllToAllDispatcher(topology.ep_group, model_cfg.lm.num_experts)
            vision = VisionEncoder(model_cfg) if stage == 0 and encoder == "colocated" else None
            module = StageModule(lm, vision)
            initialize(module, seed, model_cfg.lm.init_std)
            self.stages[stage] = module
        named = [(n, p) for m in self.stages.values() for n, p in m.named_parameters()]
        dense = [(n, p) for n, p in named if not is_expert_param(n)]
        expert = [(n, p) for n, p in named if is_expert_param(n)]
        encoder_params = []
        self.dep: DecoupledEncoder | None = None
        if encoder == "dep":  # replicated on every rank, outside the pipeline
            vision = VisionEncoder(model_cfg)
            initialize(vision, seed, model_cfg.lm.init_std, prefix="vision")
            self.dep = DecoupledEncoder(vision, topology.world_group,
                                        topology.stage0_rank_of_replica)
            encoder_params = [(f"vision.{n}", p) for n, p in vision.named_parameters()]
        # every rank of a group holds the same stages, so all members skip an empty group;
        # with a matrix rule (MuonClip) each process group has a Muon and an AdamW group
        groups = [g for params, group in ((dense, topology.dp_group),
                                          (expert, topology.edp_group),
                                          (encoder_params, topology.world_group))
                  for g in muon_param_groups(params, group, matrix_rule)]
        self.clip = matrix_rule.clip if matrix_rule is not None else None
        self.attention = track_max_logits(self.stages.values()) if self.clip else {}
        self.optimizer = Zero1Optimizer(groups, norm_group=topology.world_group, rule=rule,
                                        max_grad_norm=grad_clip, bucket_numel=bucket_numel,
                                        param_dtype=dtype,
                                        overlap_grad_reduce=overlap_grad_reduce)
        self.stage_params = {stage: list(m.parameters()) for stage, m in self.stages.items()}
        actions = schedule(sizes.pp, sizes.vpp, microbatches)[topology.pp_rank]
        self.phases: list[tuple[str, str, float, float]] = []
        self.stats: dict[str, float] = {}  # last step's extra metrics (load balance, idle)
        self.runtime = PipelineRuntime(
            actions, num_stages=sizes.stages, microbatches=microbatches,
            stage_rank=topology.stage_rank,
            activation_shape=(micro_batch, seq_len, model_cfg.lm.hidden), dtype=dtype)

    def step(self, microbatches: list[ModelInputs], lr: float, media: ReplicaMedia | None = None,
             media_ids: list[list[int]] | None = None) -> tuple[float, float]:
        """One optimizer step on this replica's microbatches; returns (global loss, grad norm).

        In DEP mode `media` holds this replica's media (metadata and pixels) and
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
        leaves = (self.dep.forward(media, is_owner=self.topo.is_first_stage)
                  if self.dep is not None else {})
        if self.dep is not None:
            self.phases.append(("DEP plan + encode + send", "dep", start, clock()))

        def forward(stage: int, x: torch.Tensor | None, mb: int) -> torch.Tensor:
            inputs = microbatches[mb]
            embeds = None
            if stage == 0 and self.dep is not None and media_ids[mb]:
                embeds = torch.cat([leaves[i] for i in media_ids[mb]])
            return self.stages[stage](inputs.tokens if x is None else x, inputs, embeds)

        def loss_fn(logits: torch.Tensor, mb: int) -> torch.Tensor:
            return cross_entropy_sum(logits, microbatches[mb].labels) / count

        loss = self.runtime.run(forward, loss_fn, lambda stage: self.optimizer.last_backward(
            self.stage_params[stage])).double()
        if self.dep is not None:
            start = clock()
            with self.optimizer.last_backward(self.dep.encoder.parameters()):
                self.dep.backward()
            self.phases.append(("DEP grads back + recompute + backward", "dep", start, clock()))
        start = clock()
        dist.all_reduce(loss, group=self.topo.world_group)  # only last stages contribute
        if self.clip is not None:  # a stage's DP replicas hold the same attention layers
            self.clip.set_max_logits(reduced_max_logits(self.attention, self.topo.dp_group))
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

    def checkpoint_state(self) -> tuple[dict, dict]:
        """(model tensors, optimizer state pieces) this rank writes; see trainer/checkpoint.py."""
        return self.named_tensors(), self.optimizer.state_pieces()

    def checkpoint_targets(self, saved: set[str]) -> tuple[dict, dict]:
        """Where a load writes, given the checkpoint's tensor names (`model.*`, `optim.*`)."""
        buffers = {n: t for n, t in self.named_tensors().items() if n.endswith("router.bias")}
        weights, state = self.optimizer.load_targets(lambda n: f"optim.{n}.master" in saved)
        return {**buffers, **weights}, state

    def finish_load(self, step: int) -> None:
        self.optimizer.finish_load(step)

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
