"""The Kimi K2 / DeepSeek-V3 style language model, buildable as contiguous layer ranges.

    tokens ─embed─> [layer 0 (dense FFN)] ... [layer k (MoE)] ... ─norm─head─> logits
    └── chunk: embed, [0, a) ─────────────┘ └─ chunk [a, b) ─┘ ... └ chunk [., L), head ┘

`LanguageModelChunk(cfg, ChunkSpec(embed, layers, head))` holds the decoder layers
`layers` (a range of global indices, possibly empty), the embedding if `embed` and
the final norm and head if `head`, so a pipeline chunk may be embedding-only,
head-only or anything between (parallel/layout.py decides which). The whole model
is `ChunkSpec.whole(cfg)`. Layers are kept in a dict keyed by their global index, so
every parameter has the same name in a chunk as in the whole model (pipeline
stages, checkpoints and equivalence tests rely on that).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.attention import DocumentMask
from model.config import LMConfig
from model.ffn import SwiGLU
from model.loss import linear_cross_entropy_sum
from model.mla import MLA
from model.moe import MoE
from model.norm import RMSNorm
from model.rope import RotaryEmbedding
from model.saved_tensors import STORE_ALL


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig, index: int, local_experts: range | None = None,
                 te: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = MLA(cfg, te)
        self.ffn_norm = RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.ffn = (SwiGLU(cfg.hidden, cfg.dense_hidden) if index < cfg.first_k_dense
                    else MoE(cfg, local_experts))
        self.memory = STORE_ALL  # the memory policy's binding (model/saved_tensors.py)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(self, x_BSD, rope_cos_sin, mask: DocumentMask):
        x_BSD = self.attention_block(x_BSD, rope_cos_sin, mask)
        with self.memory.layer():
            if not self.is_moe:
                return x_BSD + self.memory.region("ffn", self.ffn, self.ffn_input(x_BSD))
            xn_TD, scores_TE = self.ffn_input(x_BSD)
            return x_BSD + self.ffn(xn_TD, scores_TE).view(x_BSD.shape)

    def attention_block(self, x_BSD, rope_cos_sin, mask: DocumentMask):
        """x + MLA(norm(x)): the layer's first half (node-by-node runners call the halves).
        The norm runs in one region with the projections that read it (memory policy)."""
        with self.memory.layer():
            q_c, kv_c = self.memory.region("attn_norm", self._norm_and_down, x_BSD)
            return x_BSD + self.attn.attend(q_c, kv_c, rope_cos_sin, mask)

    def _norm_and_down(self, x_BSD):
        h_BSD = self.attn_norm(x_BSD)
        return self.attn.q_down(h_BSD), self.attn.kv_down(h_BSD)

    def ffn_input(self, x_BSD):
        """The FFN's normalised input: [B, S, D] for a dense FFN; for MoE ([T, D], the
        router's scores [T, E]), computed in one region so that recomputing the norm drops
        the router's saved copy of it too. Call inside `memory.layer()`."""
        def norm_and_score(x_BSD):
            if not self.is_moe:
                return self.ffn_norm(x_BSD)
            xn_TD = self.ffn_norm(x_BSD).reshape(-1, x_BSD.shape[-1])
            return xn_TD, self.ffn.router(xn_TD)
        return self.memory.region("ffn_norm", norm_and_score, x_BSD)


@dataclass(frozen=True)
class ChunkSpec:
    """What one piece of the LM holds: the embedding, a range of decoder layers, the head."""

    embed: bool
    layers: range
    head: bool

    @classmethod
    def whole(cls, cfg: LMConfig) -> "ChunkSpec":
        return cls(True, range(cfg.layers), True)

    def check(self, cfg: LMConfig) -> None:
        if self.layers.step != 1 or not 0 <= self.layers.start <= self.layers.stop <= cfg.layers:
            raise ValueError(f"layer range {self.layers} is not a contiguous range inside "
                             f"[0, {cfg.layers})")
        if not (self.embed or self.head or len(self.layers)):
            raise ValueError("a chunk must hold the embedding, a decoder layer or the head")


class LanguageModelChunk(nn.Module):
    def __init__(self, cfg: LMConfig, spec: ChunkSpec | None = None,
                 local_experts: range | None = None, te: bool = False):
        """`te`: transformer-engine kernels on CUDA (model/te_kernels.py)."""
        super().__init__()
        spec = ChunkSpec.whole(cfg) if spec is None else spec
        spec.check(cfg)
        self.cfg, self.spec = cfg, spec
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden) if spec.embed else None
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(cfg, i, local_experts, te) for i in spec.layers})
        self.norm = RMSNorm(cfg.hidden, eps=cfg.norm_eps) if spec.head else None
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False) if spec.head else None
        self.rotary = RotaryEmbedding(cfg)  # no parameters: tables computed once per forward
        self.memory = STORE_ALL  # the head's binding of the memory policy

    def forward(self, x: torch.Tensor, position_ids_BS: torch.Tensor, doc_ids_BS: torch.Tensor,
                media_embeds_MD: torch.Tensor | None = None,
                media_index_M: torch.Tensor | None = None,
                labels_BS: torch.Tensor | None = None) -> torch.Tensor:
        """x: token ids [B, S] for the chunk with the embedding, hidden states [B, S, D] otherwise.

        Returns hidden states; from the chunk with the head, logits [B, S, V], or with
        `labels_BS` the summed token cross-entropy (model/loss.py: chunked, no [B, S, V]
        fp32 logits). On the embedding's chunk, `media_embeds_MD` replace the embeddings at
        the flat positions `media_index_M` (row * S + column) of the media placeholders.
        """
        if self.embed is not None:
            x = self.embed_tokens(x, media_embeds_MD, media_index_M)
        if len(self.layers):
            rope_cos_sin, mask = self.rotary(position_ids_BS), DocumentMask(doc_ids_BS)
            for layer in self.layers.values():
                x = layer(x, rope_cos_sin, mask)
        if self.head is not None:
            if labels_BS is not None:
                return self.head_loss(x, labels_BS)
            x = self.head(self.norm(x))
        return x

    def embed_tokens(self, tokens_BS, media_embeds_MD=None, media_index_M=None) -> torch.Tensor:
        x = self.embed(tokens_BS)
        if media_embeds_MD is not None and media_index_M is not None and len(media_index_M):
            x = merge_media(x, media_embeds_MD, media_index_M)
        return x

    def head_loss(self, x_BSD: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        """The summed token cross-entropy of the head's logits (model/loss.py, chunked)."""
        return self.memory.region(
            "loss", lambda x, labels: linear_cross_entropy_sum(self.norm(x), self.head.weight,
                                                               labels), x_BSD, labels_BS)

    def moe_layers(self) -> list[MoE]:
        return [layer.ffn for layer in self.layers.values() if layer.is_moe]


def merge_media(embeds_BSD: torch.Tensor, media_embeds_MD: torch.Tensor,
                media_index_M: torch.Tensor) -> torch.Tensor:
    """Put projected vision embeddings at the placeholder positions (out of place, autograd-safe)."""
    B, S, D = embeds_BSD.shape
    if media_embeds_MD.shape[0] != media_index_M.shape[0]:
        raise ValueError(f"{media_embeds_MD.shape[0]} media embeddings for "
                         f"{media_index_M.shape[0]} placeholder positions")
    flat = embeds_BSD.reshape(B * S, D).index_put((media_index_M,), media_embeds_MD.to(embeds_BSD.dtype))
    return flat.view(B, S, D)
