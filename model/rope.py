"""Rotary position embedding for the LM's decoupled MLA key, with optional YaRN scaling.

Positions come per token (`position_ids`), because packed documents restart at
zero. YaRN (the context extension Kimi K2 / DeepSeek-V3 ship with) blends
interpolated and original frequencies over a ramp of rotation counts and scales
cos/sin by an mscale ratio; the attention softmax scale gets `attention_mscale**2`.
"""
from __future__ import annotations

import math

import torch

from model.config import LMConfig


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(rotations: float, dim: int, base: float, max_position: int) -> float:
    return dim * math.log(max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_attention_mscale(cfg: LMConfig) -> float:
    """The factor whose square multiplies the attention softmax scale under YaRN (1 without)."""
    return _yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim) if cfg.yarn_factor > 1 else 1.0


def rotary_inv_freq(cfg: LMConfig) -> torch.Tensor:
    """[rope_dim / 2] fp32 frequencies (YaRN-blended when cfg.yarn_factor > 1), on the CPU."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    if cfg.yarn_factor > 1:
        factor = cfg.yarn_factor
        low = max(math.floor(_correction_dim(cfg.yarn_beta_fast, dim, base,
                                             cfg.yarn_original_max_position)), 0)
        high = min(math.ceil(_correction_dim(cfg.yarn_beta_slow, dim, base,
                                             cfg.yarn_original_max_position)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low)
                / (high - low)).clamp(0, 1)
        keep_original = 1.0 - ramp
        inv_freq = inv_freq / factor * (1 - keep_original) + inv_freq * keep_original
    return inv_freq.float()


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.cos_sin_scale = 1.0
        self.attention_mscale = yarn_attention_mscale(cfg)
        if cfg.yarn_factor > 1:
            self.cos_sin_scale = (_yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale)
                                  / _yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim))
        self.register_buffer("inv_freq", rotary_inv_freq(cfg), persistent=False)

    def reset_buffers(self) -> None:
        self.inv_freq.copy_(rotary_inv_freq(self.cfg))

    def forward(self, position_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, S, rope_dim] for the given positions."""
        freqs_BSR = position_ids_BS.unsqueeze(-1).float() * self.inv_freq
        angles = torch.cat([freqs_BSR, freqs_BSR], dim=-1)
        return angles.cos() * self.cos_sin_scale, angles.sin() * self.cos_sin_scale


def apply_rotary(x_BSHR: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + R/2) of the last dim ('rotate half' layout), in x's dtype."""
    cos, sin = cos_BSR.unsqueeze(2).to(x_BSHR.dtype), sin_BSR.unsqueeze(2).to(x_BSHR.dtype)
    half = x_BSHR.shape[-1] // 2
    rotated = torch.cat([-x_BSHR[..., half:], x_BSHR[..., :half]], dim=-1)
    return x_BSHR * cos + rotated * sin
