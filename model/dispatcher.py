"""How routed tokens reach their experts: the seam between the model and expert parallelism.

The MoE layer never moves tokens itself. It asks a dispatcher to bring each
(token, k) pair to the rank holding its expert and to bring the results back:

    x_TD, topk_idx_TK ──dispatch──> expert_in_ND, rows_per_local_expert_E   (grouped by expert)
                                         │ grouped experts (this rank's only)
    rows_RD <───────────combine──── expert_out_ND
      row r is the output of pair route.order[r] = token * K + k (pairs sorted by expert)

The MoE layer then adds `weight * row` into token `route.order[r] // K` (a weighted
scatter-add into [T, D]; no [T, K, D] tensor). `LocalDispatcher` (here) keeps
everything on one rank; `parallel/` supplies an all-to-all dispatcher with the same
methods. Dispatchers only permute and communicate; the router weights are the MoE
layer's.

The same work is also offered in steps, so a runtime can run the all-to-alls itself
(asynchronously, under another microbatch's compute: parallel/chunk_pass.py):

    dispatch = prepare ──> all-to-all(route.send_splits -> route.recv_splits) ──> regroup
    combine  = ungroup ──> all-to-all(route.recv_splits -> route.send_splits)

`route.send_splits` is None when nothing travels (one rank holds every expert).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Route:
    """Where this rank's (token, k) pairs went: `order` is the flat pair index of each row
    of the expert-sorted block (a stable sort by expert id)."""

    order: torch.Tensor  # [T*K] int64
    top_k: int
    rows_per_expert: torch.Tensor  # [E_local]: rows each local expert receives
    send_splits: list[int] | None = None  # rows to each expert rank (None: nothing travels)
    recv_splits: list[int] | None = None  # rows from each expert rank

    @property
    def token_of_row(self) -> torch.Tensor:
        return self.order // self.top_k


def sort_by_expert(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows of x in expert order [T*K, D], their pair order [T*K], pairs per expert [E])."""
    flat_expert = topk_idx_TK.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    counts_E = torch.bincount(flat_expert, minlength=num_experts)
    return x_TD[order // topk_idx_TK.shape[1]], order, counts_E


class Dispatcher(Protocol):
    def dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, Route]:
        """(expert inputs grouped by local expert, rows per local expert [E_local], route)."""

    def combine(self, expert_out_ND: torch.Tensor, route: Route) -> torch.Tensor:
        """The expert outputs of this rank's pairs, in `route.order`: [T*K, D]."""

    def prepare(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor
                ) -> tuple[torch.Tensor, Route]:
        """The rows to send, in expert order, and the route (incl. the split sizes)."""

    def regroup(self, x_recv_ND: torch.Tensor, route: Route) -> torch.Tensor:
        """Received rows -> the experts' grouped input."""

    def ungroup(self, expert_out_ND: torch.Tensor, route: Route) -> torch.Tensor:
        """The experts' grouped output -> rows in received order, to send back."""


class LocalDispatcher:
    """All experts on this rank: a stable sort of (token, k) pairs by expert id; no host sync."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def prepare(self, x_TD, topk_idx_TK):
        rows, order, counts_E = sort_by_expert(x_TD, topk_idx_TK, self.num_experts)
        return rows, Route(order, topk_idx_TK.shape[1], counts_E)

    def regroup(self, x_recv_ND, route: Route):
        return x_recv_ND

    def ungroup(self, expert_out_ND, route: Route):
        return expert_out_ND

    def dispatch(self, x_TD, topk_idx_TK):
        rows, route = self.prepare(x_TD, topk_idx_TK)
        return rows, route.rows_per_expert, route

    def combine(self, expert_out_ND, route: Route):
        return expert_out_ND
