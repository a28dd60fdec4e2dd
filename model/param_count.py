"""Parameter counts from the config alone, without building the model.

`k25` has about a trillion parameters, so it is counted, never instantiated.
The formulas mirror the modules one to one; a test checks them against the
instantiated `tiny` and `small` models, so they cannot drift apart silently.

"Active" parameters are those one token's forward multiplies with: every dense
weight, the shared expert and `top_k` routed experts per MoE layer, the head;
not the embedding table (a lookup) and not the other routed experts. That is
the convention behind DeepSeek-V3's 37B and Kimi K2's 32B.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.config import LMConfig, ModelConfig, VisionConfig


@dataclass
class ParamCount:
    lm_total: int
    lm_active: int
    vision_total: int  # ViT + projector; every parameter is used for every patch

    @property
    def total(self) -> int:
        return self.lm_total + self.vision_total


def _swiglu(hidden: int, inner: int) -> int:
    return 3 * hidden * inner


def _mla(c: LMConfig) -> int:
    return (c.hidden * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * c.heads * c.qk_head_dim
            + c.hidden * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
            + c.kv_lora_rank * c.heads * (c.qk_nope_head_dim + c.v_head_dim)
            + c.heads * c.v_head_dim * c.hidden)


def decoder_layer_params(c: LMConfig, layer: int, experts_held: int | None = None) -> int:
    """Parameters of decoder layer `layer` (dense for the first `first_k_dense`), with
    `experts_held` of its routed experts (default: all; a rank holds num_experts / ep)."""
    attention = _mla(c) + 2 * c.hidden  # MLA and the two RMSNorms
    if layer < c.first_k_dense:
        return attention + _swiglu(c.hidden, c.dense_hidden)
    experts = c.num_experts if experts_held is None else experts_held
    shared = _swiglu(c.hidden, c.expert_hidden * c.num_shared_experts) if c.num_shared_experts else 0
    router = c.num_experts * c.hidden
    return attention + router + shared + experts * _swiglu(c.hidden, c.expert_hidden)


def embedding_params(c: LMConfig) -> int:
    return c.vocab_size * c.hidden


def head_params(c: LMConfig) -> int:
    """The final RMSNorm and the output projection."""
    return c.hidden + c.vocab_size * c.hidden


def lm_params(c: LMConfig) -> tuple[int, int]:
    """(total, active per token) of the language model."""
    total = embedding_params(c) + head_params(c) + sum(
        decoder_layer_params(c, i) for i in range(c.layers))
    active = head_params(c) + sum(decoder_layer_params(c, i, experts_held=c.top_k)
                                  for i in range(c.layers))
    return total, active


def vision_params(v: VisionConfig, lm_hidden: int) -> int:
    D = v.hidden
    block = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * v.mlp_hidden + v.mlp_hidden) \
        + (v.mlp_hidden * D + D)
    vit = (v.patch_dim * D + D) + v.pos_emb_height * v.pos_emb_width * D + v.layers * block + 2 * D
    group = D * v.merge_kernel ** 2
    projector = 2 * D + (group * group + group) + (group * lm_hidden + lm_hidden)
    return vit + projector


def count(cfg: ModelConfig) -> ParamCount:
    lm_total, lm_active = lm_params(cfg.lm)
    return ParamCount(lm_total, lm_active, vision_params(cfg.vision, cfg.lm.hidden))
