"""RMSNorm and LayerNorm whose statistics are fp32 whatever the compute dtype.

With bf16 weights and activations, a norm's mean of squares (and mean, variance) over
thousands of channels must not be accumulated in bf16 (8 bits of mantissa). These
modules upcast the input and the scale to fp32, normalise, and round the output once
to the input dtype:

    x (bf16) ──float()──> normalise in fp32 (statistics, scale, bias) ──to(bf16)──> y

In fp32 they are exactly `nn.RMSNorm` / `nn.LayerNorm` (same kernels, same bits), and
their parameters keep the same names, so checkpoints do not notice the difference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        return F.rms_norm(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias,
                            self.eps).to(x.dtype)
