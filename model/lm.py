"""The Kimi K2 / DeepSeek-V3 style language model, buildable as contiguous layer ranges.

    tokens ─embed─> [layer 0 (dense FFN)] ... [layer k (MoE)] ... ─norm─head─> logits
    └──────────── chunk [0, a) ───────────┘ └─ chunk [a, b) ─┘ ... └ chunk [., L) ┘

`LanguageModelChunk(cfg, start, stop)` holds layers [start, stop): the first chunk
also owns the embedding, the last one the final norm and the head. The whole
model is the chunk [0, L). Layers are kept in a dict keyed by their global
index, so every parameter has the same name in a chunk as in the whole model
(pipeline stages, checkpoints and equivalence tests rely on that).
"""
from __future__ import annotations

import torch
from torch import nn

from model.config import LMConfig
from model.ffn import SwiGLU
from model.mla import MLA, packed_causal_mask
from model.moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig, index: int, local_experts: range | None = None):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.ffn = (SwiGLU(cfg.hidden, cfg.dense_hidden) if index < cfg.first_k_dense
                    else MoE(cfg, local_experts))

    def forward(self, x_BSD, position_ids_BS, mask_B1SS):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), position_ids_BS, mask_B1SS)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


class LanguageModelChunk(nn.Module):
    def __init__(self, cfg: LMConfig, start: int = 0, stop: int | None = None,
                 local_experts: range | None = None):
        super().__init__()
        stop = cfg.layers if stop is None else stop
        if not 0 <= start < stop <= cfg.layers:
            raise ValueError(f"layer range [{start}, {stop}) is not inside [0, {cfg.layers})")
        self.cfg, self.start, self.stop = cfg, start, stop
        self.is_first, self.is_last = start == 0, stop == cfg.layers
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden) if self.is_first else None
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(cfg, i, local_experts) for i in range(start, stop)})
        self.norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps) if self.is_last else None
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False) if self.is_last else None

    def forward(self, x: torch.Tensor, position_ids_BS: torch.Tensor, doc_ids_BS: torch.Tensor,
                media_embeds_MD: torch.Tensor | None = None,
                media_index_M: torch.Tensor | None = None) -> torch.Tensor:
        """x: token ids [B, S] for the first chunk, hidden states [B, S, D] otherwise.

        Returns hidden states, or logits [B, S, V] from the last chunk. On the
        first chunk, `media_embeds_MD` replace the embeddings at the flat
        positions `media_index_M` (row * S + column) of the media placeholders.
        """
        if self.is_first:
            x = self.embed(x)
            if media_embeds_MD is not None and media_index_M is not None and len(media_index_M):
                x = merge_media(x, media_embeds_MD, media_index_M)
        mask = packed_causal_mask(doc_ids_BS)
        for layer in self.layers.values():
            x = layer(x, position_ids_BS, mask)
        if self.is_last:
            x = self.head(self.norm(x))
        return x

    def moe_layers(self) -> list[MoE]:
        return [layer.ffn for layer in self.layers.values() if isinstance(layer.ffn, MoE)]


def merge_media(embeds_BSD: torch.Tensor, media_embeds_MD: torch.Tensor,
                media_index_M: torch.Tensor) -> torch.Tensor:
    """Put projected vision embeddings at the placeholder positions (out of place, autograd-safe)."""
    B, S, D = embeds_BSD.shape
    if media_embeds_MD.shape[0] != media_index_M.shape[0]:
        raise ValueError(f"{media_embeds_MD.shape[0]} media embeddings for "
                         f"{media_index_M.shape[0]} placeholder positions")
    flat = embeds_BSD.reshape(B * S, D).index_put((media_index_M,), media_embeds_MD.to(embeds_BSD.dtype))
    return flat.view(B, S, D)
