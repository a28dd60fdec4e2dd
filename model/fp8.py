"""FP8-E4M3 storage of a saved activation: a 1-byte payload and its fp32 scale beside it.

    quantise:    scale = amax / 448            (per tensor, or per row: amax over the last dim)
                 payload = (x / scale) -> float8_e4m3fn          (round to nearest even)
    dequantise:  x' = payload.to(dtype) * scale

E4M3 keeps 3 mantissa bits, so a value in the normal range comes back within a relative
2^-4 of itself (half an ulp); values below the smallest normal (2^-6 * scale) lose
relative precision and come back within 2^-10 * scale (half the smallest subnormal).
A tensor (or row) of zeros keeps scale 1. `torch.float8_e4m3fn` exists on CPU and CUDA,
so the same code runs on both; on CPU it is a storage format only (no FP8 GEMM).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0
SCALINGS = ("tensor", "row")


@dataclass
class Fp8Tensor:
    """A quantised tensor: payload [..] float8_e4m3fn, scale [] or [..., 1] fp32."""

    payload: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype  # what dequantise returns

    @property
    def nbytes(self) -> int:
        return (self.payload.numel() * self.payload.element_size()
                + self.scale.numel() * self.scale.element_size())


def quantise(x: torch.Tensor, scaling: str = "tensor") -> Fp8Tensor:
    if scaling not in SCALINGS:
        raise ValueError(f"fp8 scaling={scaling!r}: one of {SCALINGS}")
    x32 = x.detach().float()
    if x.numel() == 0:
        return Fp8Tensor(x32.to(torch.float8_e4m3fn), torch.ones((), device=x.device), x.dtype)
    if scaling == "row" and x.dim() > 0:
        amax = x32.abs().amax(dim=-1, keepdim=True)
    else:
        amax = x32.abs().amax()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    payload = (x32 / scale).to(torch.float8_e4m3fn)
    return Fp8Tensor(payload, scale, x.dtype)


def dequantise(q: Fp8Tensor) -> torch.Tensor:
    return (q.payload.float() * q.scale).to(q.dtype)
