"""The reference step: the whole model in one process, plain PyTorch.

Every distributed layout is tested against this. It is deliberately the
simplest correct thing: gradient accumulation over microbatches, the global
mean loss (sum over labelled tokens / their count), `clip_grad_norm_`,
`torch.optim.AdamW`, then the routers' balancing-bias update from the step's
expert load.
"""
from __future__ import annotations

import torch

from dataloader.batch import Batch
from model.config import ModelConfig
from model.param_names import global_named_tensors, join_like_params, split_like_params
from model.vision_language import VisionLanguageModel
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
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = VisionLanguageModel(model_cfg, seed=seed, device=self.device)
        self.micro_batch = micro_batch
        self.grad_clip = optim.grad_clip
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = adamw(self.params, optim)
        self.steps_done = 0
        self.stats: dict[str, float] = {}

    def step(self, batch: Batch, lr: float) -> tuple[float, float]:
        """One optimizer step on the global batch; returns (loss, grad norm before clipping)."""
        count = max(batch.num_loss_tokens(), 1)
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        for start in range(0, batch.num_rows, self.micro_batch):
            x = model_inputs(batch.rows(start, start + self.micro_batch), device=self.device)
            loss = self.model(x.tokens, x.position_ids, x.doc_ids, x.patches, x.grid_thw,
                              x.media_index, x.labels) / count
            loss.backward()
            loss_total += loss.detach()
        for p in self.params:  # an unused parameter (an expert without tokens) has a zero
            if p.grad is None:  # gradient, as in ZeRO-1's flat buffers, not a skipped update
                p.grad = torch.zeros_like(p)
        grad_norm = clip_grad_norm_fp64(self.params, self.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        balance = []
        for moe in self.model.lm.moe_layers():
            load = moe.expert_load.clone()
            balance.append(float(load.max() / load.mean().clamp(min=1)))
            moe.update_bias(load)
        self.stats = {"expert_load_max_over_mean": max(balance) if balance else 1.0,
                      "loss_tokens": float(batch.num_loss_tokens())}
        return float(loss_total), grad_norm

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """By global name (grouped experts as one view per expert: model/param_names.py)."""
        return {name: p.detach() for name, p in global_named_tensors(self.model).items()}

    # ------------------------------------------------------------------ checkpoints

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and router balancing biases by their global names (checkpoints)."""
        out = self.named_parameters()
        out.update({n: b for n, b in self.model.named_buffers() if n.endswith("router.bias")})
        return out

    def _moments(self, empty: bool) -> dict[str, dict[str, torch.Tensor]]:
        """{global name: {exp_avg, exp_avg_sq}} (zeros before the first step or if `empty`)."""
        kinds = ("exp_avg", "exp_avg_sq")
        per_kind = {kind: {} for kind in kinds}
        for name, p in self.model.named_parameters():
            st = None if empty else self.optimizer.state.get(p)
            for kind in kinds:
                per_kind[kind][name] = st[kind] if st else torch.zeros_like(p)
        split = {kind: split_like_params(self.model, per_kind[kind]) for kind in kinds}
        return {n: {kind: split[kind][n] for kind in kinds} for n in split[kinds[0]]}

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return self._moments(empty=False)

    def empty_optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return self._moments(empty=True)

    def load_optimizer_state(self, state: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        joined = {kind: join_like_params(self.model, {n: s[kind] for n, s in state.items()})
                  for kind in ("exp_avg", "exp_avg_sq")}
        for name, p in self.model.named_parameters():
            self.optimizer.state[p] = {"step": torch.tensor(float(step)),
                                       "exp_avg": joined["exp_avg"][name].clone(),
                                       "exp_avg_sq": joined["exp_avg_sq"][name].clone()}
        self.steps_done = step

    @property
    def optimizer_steps(self) -> int:
        return self.steps_done
