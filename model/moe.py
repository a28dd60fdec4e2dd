"""Mixture of Experts with a sigmoid router and auxiliary-loss-free balancing (DeepSeek-V3, Kimi K2).

    scores  = sigmoid(x W_r^T)                         (fp32)
    chosen  = top_k(scores + bias)                     (bias: no gradient, only steers choice)
              [group-limited (DeepSeek-V3's n_group / topk_group): experts in `router_groups`
               equal groups, a group's score = the sum of its two best (scores + bias), only
               the `router_topk_groups` best groups' experts may be chosen]
    weights = scores[chosen] / sum(scores[chosen]) * routed_scaling_factor
    y       = shared_expert(x) + sum_k weights_k * expert_{chosen_k}(x)

One layer runs as four steps, each a method, so a scheduler can interleave them with
another microbatch's (the expert-parallel overlap):

    route     router scores, top-k, weights, load count      (compute)
    dispatch  pairs sorted by expert, all-to-all to experts   (communication with EP)
    experts   grouped GEMMs over this rank's experts          (compute)
    combine   all-to-all back, weighted scatter-add into      (communication, then compute)
              [T, D], plus the shared expert

After each optimizer step the trainer hands the layer the number of tokens each
expert received over the whole global batch, and the bias moves by a fixed
step toward under-used experts (`update_bias`). Experts are grouped weights of the
experts this rank holds (`local_experts`, global ids), named per global expert id
in checkpoints (model/grouped_experts.py).
"""
from __future__ import annotations

import torch
from torch import nn

from model.config import LMConfig
from model.dispatcher import Dispatcher, LocalDispatcher, Route
from model.ffn import SwiGLU
from model.grouped_experts import GroupedExperts
from model.saved_tensors import STORE_ALL


class Router(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.scaling = cfg.routed_scaling_factor
        self.groups, self.topk_groups = cfg.router_groups, cfg.router_topk_groups
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden))
        # balancing bias: a buffer (saved in checkpoints, never trained by the optimizer)
        self.register_buffer("bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def reset_buffers(self) -> None:
        self.bias.zero_()

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The scores sigmoid(x W_r^T) in fp32 [T, E] (a recomputed FFN norm recomputes
        them with it); `choose` makes the decision."""
        return torch.sigmoid(x_TD.float() @ self.weight.float().t())

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.choose(self(x_TD))

    def choose(self, scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts and their weights: the routing decision, never recomputed (the
        scores it reads are the forward's, whatever the memory policy)."""
        choice_TE = scores_TE.detach() + self.bias
        if self.topk_groups < self.groups:
            choice_TE = self._limit_to_best_groups(choice_TE)
        topk_idx_TK = torch.topk(choice_TE, self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, topk_idx_TK)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True) * self.scaling
        return topk_idx_TK, weights_TK

    def _limit_to_best_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """-inf for the experts outside each token's `topk_groups` best groups (vectorised)."""
        T, E = choice_TE.shape
        grouped_TGe = choice_TE.view(T, self.groups, E // self.groups)
        group_score_TG = grouped_TGe.topk(2, dim=-1).values.sum(-1)
        best_TG = torch.topk(group_score_TG, self.topk_groups, dim=-1).indices
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_TG, True)
        return grouped_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)


class MoE(nn.Module):
    def __init__(self, cfg: LMConfig, local_experts: range | None = None):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.local_experts = range(cfg.num_experts) if local_experts is None else local_experts
        self.bias_update_rate = cfg.bias_update_rate
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.hidden, cfg.expert_hidden, self.local_experts)
        self.shared = (SwiGLU(cfg.hidden, cfg.expert_hidden * cfg.num_shared_experts)
                       if cfg.num_shared_experts else None)
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.num_experts)
        # tokens routed to each expert since the last bias update: per-step bookkeeping
        # (summed over ranks by the trainer before `update_bias`), a buffer so it lives on the
        # layer's device, not persistent (checkpoints hold the bias it produced)
        self.register_buffer("expert_load", torch.zeros(cfg.num_experts, dtype=torch.float64),
                             persistent=False)
        self.memory = STORE_ALL  # the layer's binding of the memory policy

    def reset_buffers(self) -> None:
        self.expert_load.zero_()

    def route(self, x_TD: torch.Tensor, scores_TE: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k and weights of every token (`scores_TE`: already computed by the caller,
        with the norm), counted once in `expert_load`."""
        if scores_TE is None:
            scores_TE = self.router(x_TD)
        topk_idx_TK, weights_TK = self.memory.region("router", self.router.choose, scores_TE)
        self.expert_load += torch.bincount(topk_idx_TK.reshape(-1),
                                           minlength=self.num_experts).to(torch.float64)
        return topk_idx_TK, weights_TK

    def combine_rows(self, rows_RD: torch.Tensor, route: Route, weights_TK: torch.Tensor,
                     x_TD: torch.Tensor) -> torch.Tensor:
        """sum_k weight * expert output per token, by scatter-add, plus the shared expert."""
        y_TD = self.memory.region("combine", _weighted_sum, rows_RD, route, weights_TK, x_TD)
        if self.shared is not None:
            y_TD = y_TD + self.memory.region("shared", self.shared, x_TD)
        return y_TD

    def forward(self, x: torch.Tensor, scores_TE: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, S, D], or the normalised [T, D] with the router's `scores_TE` (the decoder
        layer computes both in one memory region); returns x's shape."""
        x_TD = x.reshape(-1, x.shape[-1])
        topk_idx_TK, weights_TK = self.route(x_TD, scores_TE)
        memory = self.memory
        expert_in_ND, rows_per_expert_E, route = memory.region(
            "dispatch", self.dispatcher.dispatch, x_TD, topk_idx_TK)
        expert_out_ND = memory.region("experts", self.experts, expert_in_ND, rows_per_expert_E)
        rows_RD = memory.region("combine", self.dispatcher.combine, expert_out_ND, route)
        return self.combine_rows(rows_RD, route, weights_TK, x_TD).view(x.shape)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Move the bias of over-loaded experts down and of under-loaded ones up."""
        load_E = load_E.to(self.router.bias.device, torch.float64)
        self.router.bias += (self.bias_update_rate
                             * torch.sign(load_E.mean() - load_E)).to(self.router.bias.dtype)
        self.expert_load.zero_()


def _weighted_sum(rows_RD: torch.Tensor, route: Route, weights_TK: torch.Tensor,
                  x_TD: torch.Tensor) -> torch.Tensor:
    weights_R = weights_TK.reshape(-1)[route.order].to(rows_RD.dtype)
    return torch.zeros_like(x_TD).index_add(0, route.token_of_row,
                                            rows_RD * weights_R.unsqueeze(-1))
