"""Multi-head Latent Attention (DeepSeek-V2/V3, Kimi K2).

    x ──q_down──> c_q ──q_norm──q_up──> [q_nope | q_rope] per head      (q_rope gets RoPE)
    x ──kv_down─> [c_kv | k_rope]                                      (k_rope: ONE head, RoPE,
                    └─kv_norm──kv_up──> [k_nope | v] per head            shared by all heads)
    attention(q = [q_nope | q_rope], k = [k_nope | k_rope], v) ──o_proj──> out

The low-rank query and the compressed KV latent are what make MLA cheap to
cache; the rope part is decoupled because RoPE does not commute with the
up-projection. Packed documents are handled with a causal same-document mask.

QK-Clip (MuonClip) needs each head's largest pre-softmax logit: with `track_max_logit`
on, the forward also computes scale * q.k per head under no_grad and keeps the running
max in `max_logit_H` until `take_max_logit`. Known limit: that is one extra dense
[B, H, S, S] score pass (the cost of the attention scores, no softmax or values), also
on GPU where attention itself is a varlen kernel; off by default (AdamW runs pay nothing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import LMConfig
from model.norm import RMSNorm
from model.rope import RotaryEmbedding, apply_rotary


def packed_causal_mask(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool: position i may attend to j <= i of the same document.

    Padding (doc -1) attends to earlier padding only, so no row is empty (an
    empty row would make softmax NaN and poison gradients).
    """
    S = doc_ids_BS.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids_BS.device).tril()
    same_doc = doc_ids_BS.unsqueeze(2) == doc_ids_BS.unsqueeze(1)
    return (same_doc & causal).unsqueeze(1)


class MLA(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.heads
        self.q_down = nn.Linear(cfg.hidden, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
        self.q_up = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_down = nn.Linear(cfg.hidden, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, eps=cfg.norm_eps)
        self.kv_up = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                               bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, cfg.hidden, bias=False)
        self.rotary = RotaryEmbedding(cfg)
        self.softmax_scale = cfg.qk_head_dim ** -0.5 * self.rotary.attention_mscale ** 2
        self.track_max_logit = False
        self.max_logit_H: torch.Tensor | None = None  # running max since take_max_logit

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

    def forward(self, x_BSD: torch.Tensor, position_ids_BS: torch.Tensor,
                mask_B1SS: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, S, _ = x_BSD.shape
        H, nope, rope, vdim = cfg.heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q_BSHQ = self.q_up(self.q_norm(self.q_down(x_BSD))).view(B, S, H, nope + rope)
        q_nope, q_rope = q_BSHQ.split([nope, rope], dim=-1)
        c_kv, k_rope_BSR = self.kv_down(x_BSD).split([cfg.kv_lora_rank, rope], dim=-1)
        kv_BSHK = self.kv_up(self.kv_norm(c_kv)).view(B, S, H, nope + vdim)
        k_nope, v_BSHV = kv_BSHK.split([nope, vdim], dim=-1)

        cos, sin = self.rotary(position_ids_BS)
        q_rope = apply_rotary(q_rope, cos, sin)
        k_rope_BS1R = apply_rotary(k_rope_BSR.unsqueeze(2), cos, sin)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_rope_BS1R.expand(B, S, H, rope)], dim=-1).transpose(1, 2)
        v = v_BSHV.transpose(1, 2)
        if self.track_max_logit:
            self._track_max_logit(q, k, mask_B1SS)
        out_BHSV = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1SS,
                                                  scale=self.softmax_scale)
        return self.o_proj(out_BHSV.transpose(1, 2).reshape(B, S, H * vdim))

