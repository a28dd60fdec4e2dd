"""One optimizer step of the model spread over PP x DP ranks, with EP inside each stage.

    ┌ trainer: this replica's microbatches, lr ──────────────────────────────────────────┐
    │ 1. global count of labelled tokens (all_reduce over the DP group)                  │
    │ 2. pipeline schedule (interleaved 1F1B) over this rank's chunks; MoE layers talk   │
    │    to their experts through the all-to-all dispatcher of the EP group              │
    │ 3. ZeRO-1: dense grads reduce-scattered over DP, expert grads over expert-DP,      │
    │    each bucket as soon as the chunk's last backward completes it (overlapped);     │
    │    one global grad norm over the world, the update rule on the fp32 shards,        │
    │    params all-gathered in the compute dtype (fp32 or bf16)                         │
    │ 4. per-step model statistics in ONE all-reduce over DP (parallel/step_statistics): │
    │    router loads (SUM: same bias update on every copy) and, with QK-Clip, each      │
    │    head's max logit (MAX), stacked over all this rank's layers                     │
    └────────────────────────────────────────────────────────────────────────────────────┘

Each rank builds only its own chunks (what `layout` puts in every stage it holds:
parallel/layout.py) and only its experts; parameters are initialised by name, so they
equal the single-process model's. With `encoder = "colocated"` the vision
encoder lives in stage 0 and its gradients are reduced over the DP group like
the rest of stage 0.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from model.config import ModelConfig
from model.init import materialize
from model.inputs import ModelInputs
from model.lm import LanguageModelChunk
from model.memory_policy import MemoryPolicy
from model.saved_tensors import ActivationMemory
from model.param_names import expert_entry_names, global_named_tensors
from model.loss import IGNORE_INDEX
from model.moe import MoE
from model.vision_language import VisionEncoder
from parallel.chunk_pass import ChunkPass
from parallel.dep import DecoupledEncoder, StepMedia
from parallel.dep_bubbles import with_encoder_recompute
from parallel.expert_dispatch import AllToAllDispatcher
from parallel.flat_chunks import split_grouped
from parallel.layout import PipelineLayout
from parallel.muon import Muon, muon_param_groups
from parallel.pipeline_runtime import PipelineRuntime
from parallel.qk_clip import track_max_logits
from parallel.schedule import COMPUTE_OPS, schedule
from parallel.step_clock import StepClock
from parallel.step_statistics import reduce_step_statistics
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
        """Hidden states, or the summed loss of the microbatch from the chunk with the head.
        `media_embeds` (DEP) replace the encoder; colocated stage 0 runs its own encoder."""
        if media_embeds is None and self.vision is not None and inputs.grid_thw:
            media_embeds = self.vision(inputs.patches, inputs.grid_thw)
        return self.lm(x, inputs.position_ids, inputs.doc_ids, media_embeds, inputs.media_index,
                       inputs.labels)

    def embed_inputs(self, inputs: ModelInputs, media_embeds: torch.Tensor | None
                     ) -> torch.Tensor:
        """The embedding chunk's first step, as `forward` runs it (for node-by-node runs)."""
        if media_embeds is None and self.vision is not None and inputs.grid_thw:
            media_embeds = self.vision(inputs.patches, inputs.grid_thw)
        return self.lm.embed_tokens(inputs.tokens, media_embeds, inputs.media_index)


def is_expert_param(name: str) -> bool:
    return ".experts." in name


def stage_module(model_cfg: ModelConfig, layout: PipelineLayout, stage: int,
                 local_experts: range, encoder: str) -> StageModule:
    """Chunk `stage` of `layout` with these experts, and the encoder on a colocated stage 0
    (not initialised: both the engine and the planner build it on `meta`; the engine then
    materialises it on its device)."""
    lm = LanguageModelChunk(model_cfg.lm, layout.chunks[stage], local_experts, model_cfg.te)
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


def update_router_biases(moe: dict[str, MoE], loads: dict[str, torch.Tensor]) -> float:
    """The balancing-bias update of every MoE layer from its step's reduced load; returns the
    largest max/mean load ratio over the layers (1.0 without MoE layers)."""
    if not moe:
        return 1.0
    balance = torch.stack([loads[n].max() / loads[n].mean().clamp(min=1) for n in moe]).max()
    for name, layer in moe.items():
        layer.update_bias(loads[name])
    return float(balance)


class ParallelEngine:
    def __init__(self, model_cfg: ModelConfig, topology: Topology, layout: PipelineLayout, *,
                 micro_batch: int, seq_len: int, microbatches: int, seed: int,
                 rule: UpdateRule, grad_clip: float, encoder: str = "colocated",
                 dtype: torch.dtype = torch.float32, bucket_numel: int = DEFAULT_BUCKET_NUMEL,
                 overlap_grad_reduce: bool = True, device: torch.device | str = "cpu",
                 ep_overlap: bool = False, matrix_rule: Muon | None = None,
                 memory_policy: MemoryPolicy | None = None):
        """`ep_overlap` (applies with ep > 1): chunks run node by node and the steady state's
        forward/backward pairs interleave, hiding expert all-to-alls (parallel/chunk_pass.py).
        `matrix_rule` (MuonClip): Muon for the hidden matrices, the optimizer's rule for the
        rest, QK-Clip after each update. `memory_policy`: what the forward keeps for the
        backward (model/memory_policy.py); None stores everything without accounting."""
        if encoder not in ("colocated", "dep"):
            raise ValueError(f"encoder={encoder!r}: choose 'dep' or 'colocated'")
        self.cfg, self.topo = model_cfg, topology
        self.device = torch.device(device)
        sizes = topology.sizes
        self.microbatches = microbatches
        if len(layout.chunks) != sizes.stages:
            raise ValueError(f"layout has {len(layout.chunks)} chunks for {sizes.stages} stages")
        self.layout = layout
        local_experts = topology.local_experts(model_cfg.lm.num_experts)
        self.stages: dict[int, StageModule] = {}
        for stage in topology.stages_of_rank():
            with torch.device("meta"):  # allocated on the device and initialised by name below
                module = stage_module(model_cfg, layout, stage, local_experts, encoder)
            materialize(module, self.device, seed, model_cfg.lm.init_std)
            for moe in module.lm.moe_layers():
                moe.dispatcher = AllToAllDispatcher(topology.ep_group, model_cfg.lm.num_experts,
                                                    topology.ep_meta_group)
            self.stages[stage] = module
        self.dep: DecoupledEncoder | None = None
        if encoder == "dep":  # replicated on every rank, outside the pipeline
            with torch.device("meta"):
                vision = VisionEncoder(model_cfg)
            materialize(vision, self.device, seed, model_cfg.lm.init_std, prefix="vision")
            self.dep = DecoupledEncoder(vision, topology.dep_group, topology.dep_stage0_ranks)
        process_groups = {"dense": topology.dp_group, "expert": topology.edp_group,
                          "encoder": topology.world_group}
        # with a matrix rule (MuonClip) each process group has a Muon and an AdamW group
        groups = [g for kind, params in zero1_param_groups(
                      self.stages, self.dep.encoder if self.dep else None).items()
                  for g in muon_param_groups(params, process_groups[kind], matrix_rule)]
        self.clip = matrix_rule.clip if matrix_rule is not None else None
        self.attention = track_max_logits(self.stages.values()) if self.clip else {}
        self.moe = {name: moe for module in self.stages.values()
                    for name, moe in module.named_modules() if isinstance(moe, MoE)}
        self.optimizer = Zero1Optimizer(groups, norm_group=topology.world_group, rule=rule,
                                        max_grad_norm=grad_clip, bucket_numel=bucket_numel,
                                        param_dtype=dtype,
                                        overlap_grad_reduce=overlap_grad_reduce)
        self.stage_params = {stage: list(m.parameters()) for stage, m in self.stages.items()}
        self.memory: ActivationMemory | None = None
        if memory_policy is not None:
            self.memory = ActivationMemory(memory_policy, self.device)
            for module, prefix in self._modules_by_prefix():
                self.memory.attach(module, prefix)
            # after ZeRO-1 rebound the parameters to its buffers
            self.memory.refresh_parameters([m for m, _ in self._modules_by_prefix()])
        self.ep_overlap = ep_overlap and sizes.ep > 1
        actions = self._schedule()
        self._phase_marks: list[tuple[str, str, object, object]] = []
        self.stats: dict[str, float] = {}  # last step's extra metrics (load balance, idle)
        self.clock = StepClock(self.device)  # CUDA events on GPU: host times only time launches
        self.runtime = PipelineRuntime(
            actions, num_stages=sizes.stages, microbatches=microbatches,
            stage_rank=topology.stage_rank,
            activation_shape=(micro_batch, seq_len, model_cfg.lm.hidden), dtype=dtype,
            device=self.device, clock=self.clock)

    @property
    def phases(self) -> list[tuple[str, str, float, float]]:
        """(name, category, start, end) of the last step's work outside the schedule, and of
        its expert all-to-alls (category "a2a": issued .. waited for)."""
        return [(name, kind, self.clock.seconds(a), self.clock.seconds(b))
                for name, kind, a, b in self._phase_marks] + [
            (name, "a2a", start, end) for name, start, end in self.runtime.comm_timeline]

    def step(self, microbatches: list[ModelInputs], lr: float, media: StepMedia | None = None,
             media_ids: list[list[int]] | None = None) -> tuple[float, float]:
        """One optimizer step on this replica's microbatches; returns (global loss, grad norm).

        In DEP mode `media` describes the step's media of the DEP group (metadata, and a
        callback that fetches the pixels of the items this rank encodes) and
        `media_ids[mb]` the item ids of microbatch `mb` in placeholder order.
        """
        if len(microbatches) != self.microbatches:
            raise ValueError(f"expected {self.microbatches} microbatches, got {len(microbatches)}")
        count = torch.stack([(m.labels != IGNORE_INDEX).sum() for m in microbatches]).sum()
        count = count.to(torch.float64)
        dist.all_reduce(count, group=self.topo.dp_group)
        self.stats["loss_tokens"] = float(count)
        count = max(float(count), 1.0)

        phases = self._phase_marks = []
        memory = self.memory
        if memory is not None:
            memory.start_step()
        clock = self.clock
        clock.start()
        start = clock.mark()
        leaves = self.dep.forward(media) if self.dep is not None else {}
        if self.dep is not None:
            phases.append(("DEP plan + fetch + encode + send", "dep", start, clock.mark()))
            self.stats.update(self.dep.stats)

        def media_embeds(stage: int, mb: int) -> torch.Tensor | None:
            if stage == 0 and self.dep is not None and media_ids[mb]:
                return torch.cat([leaves[i] for i in media_ids[mb]])
            return None

        def memory_pass(stage: int, mb: int):
            return memory.pass_of((stage, mb)) if memory is not None else nullcontext()

        def forward(stage: int, x: torch.Tensor | None, mb: int) -> torch.Tensor:
            inputs = microbatches[mb]
            with memory_pass(stage, mb):
                return self.stages[stage](inputs.tokens if x is None else x, inputs,
                                          media_embeds(stage, mb))

        def loss_fn(loss_sum: torch.Tensor, mb: int) -> torch.Tensor:
            return loss_sum / count

        def make_pass(stage: int, x: torch.Tensor | None, mb: int) -> ChunkPass:
            return ChunkPass(self.stages[stage], x, microbatches[mb], media_embeds(stage, mb),
                             lambda loss_sum: loss_fn(loss_sum, mb), self.clock,
                             lambda: memory_pass(stage, mb))

        loss = self.runtime.run(
            forward, loss_fn, make_pass if self.ep_overlap else None,
            lambda stage: self.optimizer.last_backward(self.stage_params[stage]),
            self.dep.recompute if self.dep is not None else None,
            prefetch=memory.prefetch if memory is not None else None).double()
        self.stats["a2a_wait_s"] = sum(wait for _, wait in self.runtime.a2a.values())
        if self.dep is not None:
            start = clock.mark()
            with self.optimizer.last_backward(self.dep.encoder.parameters()):
                self.dep.backward()
            phases.append(("DEP grads back + backward", "dep", start, clock.mark()))
        start = clock.mark()
        dist.all_reduce(loss, group=self.topo.world_group)  # only last stages contribute
        # a stage's DP replicas hold the same layers: one collective for all their statistics
        loads, max_logits = reduce_step_statistics(
            {name: moe.expert_load for name, moe in self.moe.items()},
            {name: mla.take_max_logit() for name, mla in self.attention.items()},
            self.topo.dp_group)
        if self.clip is not None:
            self.clip.set_max_logits(max_logits)
        grad_norm = self.optimizer.step(lr)
        self.optimizer.zero_grad()
        self.stats["expert_load_max_over_mean"] = update_router_biases(self.moe, loads)
        phases.append(("loss all-reduce + ZeRO-1 step + router bias", "optimizer", start,
                       clock.mark()))
        clock.resolve()
        self.stats["pipeline_idle_fraction"] = self._pipeline_idle_fraction()
        if memory is not None:
            self.stats.update(memory.step_stats(forwards=self.microbatches * len(self.stages)))
        return float(loss), float(grad_norm)

    def set_ep_overlap(self, on: bool) -> None:
        """Switch the overlapped schedule on or off between steps (benchmarks compare both
        on one engine); every rank must switch together."""
        sizes = self.topo.sizes
        self.ep_overlap = on and sizes.ep > 1
        self.runtime.actions = self._schedule()

    def _schedule(self) -> list:
        """This rank's actions; under DEP with the encoder recompute in a bubble."""
        sizes = self.topo.sizes
        per_rank = schedule(sizes.pp, sizes.vpp, self.microbatches, self.ep_overlap)
        if self.dep is not None:
            per_rank = with_encoder_recompute(per_rank, sizes.pp, sizes.vpp)
        return per_rank[self.topo.pp_rank]

    def _pipeline_idle_fraction(self) -> float:
        """This rank's idle share of its pipeline window (the bubble as this rank saw it)."""
        timeline = self.runtime.timeline
        window = timeline[-1].end - timeline[0].start
        compute = sum(r.end - r.start for r in timeline if r.action.op in COMPUTE_OPS)
        return (window - compute) / window if window > 0 else 0.0

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> tuple[dict, dict]:
        """(model tensors, optimizer state pieces) this rank writes, by global name; see
        trainer/checkpoint.py."""
        return self.named_tensors(), split_grouped(self.optimizer.state_pieces(),
                                                   self._expert_entries())

    def checkpoint_targets(self, saved: set[str]) -> tuple[dict, dict]:
        """Where a load writes, given the checkpoint's tensor names (`model.*`, `optim.*`)."""
        experts = self._expert_entries()
        buffers = {n: t for n, t in self.named_tensors().items() if n.endswith("router.bias")}
        weights, state = self.optimizer.load_targets(
            lambda n: f"optim.{experts.get(n, [n])[0]}.master" in saved)
        return ({**buffers, **split_grouped(weights, experts)},
                split_grouped(state, experts))

    def finish_load(self, step: int) -> None:
        self.optimizer.finish_load(step)

    def _modules_by_prefix(self) -> list[tuple[nn.Module, str]]:
        named = [(module, "") for module in self.stages.values()]
        return named + ([(self.dep.encoder, "vision")] if self.dep is not None else [])

    def _expert_entries(self) -> dict[str, list[str]]:
        """{grouped expert parameter name: its experts' global names}."""
        return {name: names for module, prefix in self._modules_by_prefix()
                for name, names in expert_entry_names(module, prefix).items()}

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and router-bias buffers this rank holds, by their global names."""
        out = {}
        for module, prefix in self._modules_by_prefix():
            out.update({n: p.detach() for n, p in global_named_tensors(module, prefix).items()})
            out.update({n: b for n, b in module.named_buffers(prefix=prefix)
                        if n.endswith("router.bias")})
        return out
