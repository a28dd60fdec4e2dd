"""How routed tokens reach their experts: the seam between the model and expert parallelism.

The MoE layer never moves tokens itself. It asks a dispatcher to bring each
(token, k) pair to the rank holding its expert and to bring the results back:

    x_TD, topk_idx_TK ──dispatch──> expert_in_ND, tokens_per_local_expert   (grouped by local expert)
                                         │ experts (this rank's only)
    out_TKD <────────combine─────── expert_out_ND

`LocalDispatcher` (here) keeps everything on one rank. `parallel/` supplies an
all-to-all dispatcher with the same two methods for expert parallelism; the
router weights are applied by the MoE layer after `combine`, so a dispatcher
only permutes and communicates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Dispatcher(Protocol):
    def dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor
                 ) -> tuple[torch.Tensor, list[int], Any]:
        """Return (expert inputs grouped by local expert, rows per local expert, context)."""

    def combine(self, expert_out_ND: torch.Tensor, context: Any) -> torch.Tensor:
        """Return the expert outputs back in (token, k) order: [T, K, D]."""


@dataclass
class _LocalContext:
    order: torch.Tensor  # position in the (token, k) flattening of each dispatched row
    num_tokens: int
    top_k: int


class LocalDispatcher:
    """All experts on this rank: a stable sort of (token, k) pairs by expert id."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TD, topk_idx_TK):
        T, K = topk_idx_TK.shape
        flat_expert = topk_idx_TK.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        return x_TD[order // K], counts.tolist(), _LocalContext(order, T, K)

    def combine(self, expert_out_ND, context: _LocalContext):
        out = torch.empty_like(expert_out_ND)
        out[context.order] = expert_out_ND
        return out.view(context.num_tokens, context.top_k, -1)
