"""The reference step: the whole model in one process, plain PyTorch.

Every distributed layout is tested against this. It is deliberately the
simplest correct thing: gradient accumulation over microbatches, the global
mean loss (sum over labelled tokens / their count), `clip_grad_norm_`,
`torch.optim.AdamW`, then the routers' balancing-bias update from the step's
expert load.

With `dtype=torch.bfloat16` the optimizer is instead ZeRO-1 over a world of one
(parallel/zero1.py): bf16 weights for compute, fp32 gradient accumulation, fp32
master weights and state. That is the reference bf16 layouts are compared to, and
`torch.optim.AdamW` stays the fp32 reference (and keeps its numbers). MuonClip
(`optim.name = "muonclip"`) always runs through that ZeRO-1 of one, where its rules live.
"""
from __future__ import annotations

import torch

from dataloader.batch import Batch
from model.config import ModelConfig
from model.memory_policy import MemoryPolicy
from model.moe import MoE
from model.param_names import expert_entry_names, global_named_tensors
from model.saved_tensors import ActivationMemory
from model.vision_language import VisionLanguageModel
from parallel.flat_chunks import split_grouped
from parallel.muon import muon_param_groups
from parallel.engine import update_router_biases
from parallel.qk_clip import track_max_logits
from parallel.step_statistics import reduce_step_statistics
from parallel.zero1 import Zero1Optimizer
from trainer.batch_inputs import model_inputs
from trainer.config import OptimSection


def decays(param: torch.nn.Parameter) -> bool:
    """Weight decay on matrices and tables only; never on norm scales or biases."""
    return param.ndim >= 2


def adamw(params: list[torch.nn.Parameter], optim: OptimSection) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [{"params": [p for p in params if decays(p)], "weight_decay": optim.weight_decay},
         {"params": [p for p in params if not decays(p)], "weight_decay": 0.0}],
        lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)


@torch.no_grad()
def clip_grad_norm_fp64(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """`clip_grad_norm_` with the norm accumulated in float64.

    fp32 accumulation over millions of elements is off by ~1e-4 relative; the
    clip coefficient then differs between layouts more than the tests allow.
    `max_norm <= 0` only measures.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.sqrt(sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads))
    if max_norm > 0:
        coef = (max_norm / (norm.float() + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef)
    return float(norm)


class SingleProcessEngine:
    def __init__(self, model_cfg: ModelConfig, optim: OptimSection, micro_batch: int, seed: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 memory_policy: MemoryPolicy | None = None):
        self.device = torch.device(device)
        self.model = VisionLanguageModel(model_cfg, seed=seed, device=self.device)
        self.micro_batch = micro_batch
        self.grad_clip = optim.grad_clip
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.zero1: Zero1Optimizer | None = None
        matrix_rule = optim.matrix_rule(model_cfg.lm)
        self.clip = matrix_rule.clip if matrix_rule is not None else None
        self.attention = track_max_logits([self.model]) if self.clip else {}
        self.moe = {n: m for n, m in self.model.named_modules() if isinstance(m, MoE)}
        if dtype == torch.float32 and matrix_rule is None:
            self.optimizer = adamw(self.params, optim)
        else:  # masters from the fp32 init, then the parameters become bf16
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self.zero1 = Zero1Optimizer(
                muon_param_groups(named, None, matrix_rule),
                norm_group=None, rule=optim.update_rule(), max_grad_norm=optim.grad_clip,
                param_dtype=dtype)
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}
        self.stats: dict[str, float] = {}
        self.memory: ActivationMemory | None = None
        if memory_policy is not None:  # after ZeRO-1 rebound the parameters (bf16)
            self.memory = ActivationMemory(memory_policy, self.device)
            self.memory.attach(self.model)

    def step(self, batch: Batch, lr: float) -> tuple[float, float]:
        """One optimizer step on the global batch; returns (loss, grad norm before clipping)."""
        count = max(batch.num_loss_tokens(), 1)
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.memory is not None:
            self.memory.start_step()
        for start in range(0, batch.num_rows, self.micro_batch):
            x = model_inputs(batch.rows(start, start + self.micro_batch), device=self.device)
            loss = self.model(x.tokens, x.position_ids, x.doc_ids, x.patches, x.grid_thw,
                              x.media_index, x.labels) / count
            loss.backward()
            loss_total += loss.detach()
        loads, max_logits = reduce_step_statistics(  # as the parallel engine, without a group
            {name: moe.expert_load for name, moe in self.moe.items()},
            {name: mla.take_max_logit() for name, mla in self.attention.items()}, None)
        if self.clip is not None:
            self.clip.set_max_logits(max_logits)
        if self.zero1 is not None:
            grad_norm = float(self.zero1.step(lr))
            self.zero1.zero_grad()
        else:
            grad_norm = self._adamw_step(lr)
        self.stats = {"expert_load_max_over_mean": update_router_biases(self.moe, loads),
                      "loss_tokens": float(batch.num_loss_tokens())}
        if self.memory is not None:
            self.stats.update(self.memory.step_stats(
                forwards=-(-batch.num_rows // self.micro_batch)))
        return float(loss_total), grad_norm

    def _adamw_step(self, lr: float) -> float:
        for p in self.params:  # an unused parameter (an expert without tokens) has a zero
            if p.grad is None:  # gradient, as in ZeRO-1's flat buffers, not a skipped update
                p.grad = torch.zeros_like(p)
        grad_norm = clip_grad_norm_fp64(self.params, self.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """By global name (grouped experts as one view per expert: model/param_names.py)."""
        return {name: p.detach() for name, p in global_named_tensors(self.model).items()}

    # ------------------------------------------------------------------ checkpoints
    # The layout of trainer/checkpoint.py: optimizer state as 1-D entries per parameter.

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and router balancing biases by their global names (checkpoints)."""
        out = self.named_parameters()
        out.update({n: b for n, b in self.model.named_buffers() if n.endswith("router.bias")})
        return out

    def checkpoint_state(self) -> tuple[dict, dict]:
        experts = expert_entry_names(self.model)
        if self.zero1 is not None:
            return self.named_tensors(), split_grouped(self.zero1.state_pieces(), experts)
        optim = {}
        for name, p in self.model.named_parameters():
            st = self.optimizer.state.get(p)  # empty only before the first step
            optim[name] = {kind: (st[kind] if st else torch.zeros_like(p)).reshape(-1)
                           for kind in ("exp_avg", "exp_avg_sq")}
        return self.named_tensors(), split_grouped(optim, experts)

    def checkpoint_targets(self, saved: set[str]) -> tuple[dict, dict]:
        """Where a load writes. fp32 weights come from a bf16 run's masters when it has them."""
        experts = expert_entry_names(self.model)
        if self.zero1 is not None:
            buffers = {n: t for n, t in self.named_tensors().items() if n.endswith("router.bias")}
            weights, state = self.zero1.load_targets(
                lambda n: f"optim.{experts.get(n, [n])[0]}.master" in saved)
            return ({**buffers, **split_grouped(weights, experts)},
                    split_grouped(state, experts))
        model = self.named_tensors()
        self._loaded = {name: {kind: torch.zeros(p.numel(), device=p.device)
                               for kind in ("exp_avg", "exp_avg_sq")}
                        for name, p in self.model.named_parameters()}
        targets = split_grouped(self._loaded, experts)
        for name, kinds in targets.items():
            if f"optim.{name}.master" in saved:
                kinds["master"] = model.pop(name).reshape(-1)  # the parameter (a view), flat
        return model, targets

    def finish_load(self, step: int) -> None:
        if self.zero1 is not None:
            self.zero1.finish_load(step)
        else:
            for name, p in self.model.named_parameters():
                loaded = self._loaded[name]
                self.optimizer.state[p] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": loaded["exp_avg"].view(p.shape),
                    "exp_avg_sq": loaded["exp_avg_sq"].view(p.shape)}
            self._loaded = {}
