"""A layer's routed experts as grouped weights: one grouped GEMM per projection, not a loop.

    expert inputs, grouped by local expert           weights [E_local, out, in]
    x_ND = | e0 rows | e1 rows (may be 0) | e2 ... |  offs = cumsum(rows per expert)
        gate = x W_gate^T, up = x W_up^T   (each ONE torch._grouped_mm over all experts)
        out  = (silu(gate) * up) W_down^T  (one more)

Each slice `weight[i]` is expert `first + i`'s own [out, in] matrix, exactly what a
per-expert `nn.Linear` holds (on CPU `_grouped_mm` gives bitwise the per-expert matmuls).
Checkpoints, initialisation and the optimizer's per-matrix rules still name every expert
by its global id (`experts.{e}.gate.weight`, as the per-expert modules did):
model/param_names.py is the one place that maps the grouped parameters to those names,
so any expert-parallel size can save and resume.

Known limit: torch 2.13's CUDA `_grouped_mm` takes bf16 with 16-byte aligned dims only;
other dtypes on CUDA (fp32 correctness runs) fall back to one matmul per expert.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `_grouped_mm`'s
    backward refuses expanded (stride-0) gradients, e.g. the one of a `.sum()`."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_linear(x_ND: torch.Tensor, weight_EOI: torch.Tensor, offs_E: torch.Tensor
                   ) -> torch.Tensor:
    """Rows [offs[e-1], offs[e]) of x times weight[e]^T, for every local expert e."""
    if x_ND.is_cuda and not (x_ND.dtype == torch.bfloat16 and weight_EOI.shape[-1] % 8 == 0
                             and weight_EOI.shape[-2] % 8 == 0):
        bounds = [0, *offs_E.tolist()]  # the fallback (see the module docstring)
        return torch.cat([F.linear(x_ND[a:b], weight_EOI[e])
                          for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    return _ContiguousGrad.apply(torch._grouped_mm(x_ND, weight_EOI.transpose(1, 2), offs=offs_E))


class GroupedExperts(nn.Module):
    """SwiGLU experts `experts` (a range of global ids) of one MoE layer."""

    def __init__(self, hidden: int, inner: int, experts: range):
        super().__init__()
        self.experts = experts
        n = len(experts)
        self.gate = nn.Parameter(torch.empty(n, inner, hidden))
        self.up = nn.Parameter(torch.empty(n, inner, hidden))
        self.down = nn.Parameter(torch.empty(n, hidden, inner))

    def forward(self, x_ND: torch.Tensor, rows_per_expert_E: torch.Tensor) -> torch.Tensor:
        offs_E = rows_per_expert_E.cumsum(0).to(torch.int32)
        hidden_NI = F.silu(grouped_linear(x_ND, self.gate, offs_E)) * grouped_linear(
            x_ND, self.up, offs_E)
        return grouped_linear(hidden_NI, self.down, offs_E)
