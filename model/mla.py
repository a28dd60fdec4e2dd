"""Multi-head Latent Attention (DeepSeek-V2/V3, Kimi K2).

    x ──q_down──> c_q ──q_norm──q_up──> [q_nope | q_rope] per head      (q_rope gets RoPE)
    x ──kv_down─> [c_kv | k_rope]                                      (k_rope: ONE head, RoPE,
                    └─kv_norm──kv_up──> [k_nope | v] per head            shared by all heads)
    attention(q = [q_nope | q_rope], k = [k_nope | k_rope], v) ──o_proj──> out

The low-rank query and the compressed KV latent are what make MLA cheap to
cache; the rope part is decoupled because RoPE does not commute with the
up-projection. Packed documents attend causally within themselves (model/attention.py
picks the kernel; the mask and the rotary tables are computed once per forward by the
caller and shared by every layer).

QK-Clip (MuonClip) needs each head's largest pre-softmax logit: with `track_max_logit`
on, the forward also computes scale * q.k per head under no_grad and keeps the running
max in `max_logit_H` until `take_max_logit`. Known limit: that is one extra dense
[B, H, S, S] score pass (the cost of the attention scores, no softmax or values), also
on GPU where attention itself is a varlen kernel; off by default (AdamW runs pay nothing).
"""
from __future__ import annotations

import torch
from torch import nn

from model.attention import DocumentMask, document_attention
from model.config import LMConfig
from model.norm import RMSNorm
from model.rope import apply_rotary, yarn_attention_mscale
from model.saved_tensors import STORE_ALL
from model.te_kernels import norm_then_linear


class MLA(nn.Module):
    def __init__(self, cfg: LMConfig, te: bool = False):
        super().__init__()
        self.cfg, self.te = cfg, te
        H = cfg.heads
        self.q_down = nn.Linear(cfg.hidden, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, eps=cfg.latent_norm_eps)
        self.q_up = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_down = nn.Linear(cfg.hidden, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, eps=cfg.latent_norm_eps)
        self.kv_up = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                               bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, cfg.hidden, bias=False)
        self.softmax_scale = cfg.qk_head_dim ** -0.5 * yarn_attention_mscale(cfg) ** 2
        self.track_max_logit = False
        self.max_logit_H: torch.Tensor | None = None  # running max since take_max_logit
        self.memory = STORE_ALL  # the layer's binding of the memory policy

    def take_max_logit(self) -> torch.Tensor:
        """[H] fp32 largest logit per head since the last call (-inf if no forward ran)."""
        out = self.max_logit_H
        self.max_logit_H = None
        if out is None:
            return torch.full((self.cfg.heads,), float("-inf"), device=self.o_proj.weight.device)
        return out

    @torch.no_grad()
    def _track_max_logit(self, q_BHSQ: torch.Tensor, k_BHSQ: torch.Tensor,
                         mask_B1SS: torch.Tensor) -> None:
        logits = (q_BHSQ.float() @ k_BHSQ.float().transpose(-1, -2)) * self.softmax_scale
        max_H = logits.masked_fill(~mask_B1SS, float("-inf")).amax(dim=(0, 2, 3))
        self.max_logit_H = max_H if self.max_logit_H is None else torch.maximum(
            self.max_logit_H, max_H)

    def forward(self, x_BSD: torch.Tensor, rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
                mask: DocumentMask) -> torch.Tensor:
        """`rope_cos_sin`: `RotaryEmbedding(position_ids)`, [B, S, rope_dim] each."""
        return self.attend(self.q_down(x_BSD), self.kv_down(x_BSD), rope_cos_sin, mask)

    def attend(self, q_c, kv_c, rope_cos_sin, mask: DocumentMask) -> torch.Tensor:
        """Attention from the down-projections (the decoder layer computes those in one
        memory region with its norm): up-projections, attention, o_proj, each a region."""
        memory = self.memory
        rope = self.cfg.qk_rope_head_dim
        q_BSHQ = memory.region("q_up", lambda c: norm_then_linear(self.q_norm, self.q_up, c,
                                                                  self.te), q_c)
        c_kv, k_rope_BSR = kv_c.split([self.cfg.kv_lora_rank, rope], dim=-1)
        kv_BSHK = memory.region("kv_up", lambda c: norm_then_linear(self.kv_norm, self.kv_up, c,
                                                                    self.te), c_kv)
        out_BSO = memory.region("attention", self._attention, q_BSHQ, kv_BSHK, k_rope_BSR,
                                rope_cos_sin, mask)
        return memory.region("o_proj", self.o_proj, out_BSO)

    def _attention(self, q_BSHQ, kv_BSHK, k_rope_BSR, rope_cos_sin, mask: DocumentMask):
        cfg = self.cfg
        B, S = q_BSHQ.shape[:2]
        H, nope, rope, vdim = cfg.heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q_nope, q_rope = q_BSHQ.view(B, S, H, nope + rope).split([nope, rope], dim=-1)
        k_nope, v_BSHV = kv_BSHK.view(B, S, H, nope + vdim).split([nope, vdim], dim=-1)

        cos, sin = rope_cos_sin
        q_rope = apply_rotary(q_rope, cos, sin)
        k_rope_BS1R = apply_rotary(k_rope_BSR.unsqueeze(2), cos, sin)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_rope_BS1R.expand(B, S, H, rope)], dim=-1).transpose(1, 2)
        v = v_BSHV.transpose(1, 2)
        if self.track_max_logit:
            self._track_max_logit(q, k, mask.dense_B1SS)
        out_BHSV = document_attention(q, k, v, mask, self.softmax_scale, self.te)
        return out_BHSV.transpose(1, 2).reshape(B, S, H * vdim)
