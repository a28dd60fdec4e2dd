"""Analytic model FLOPs, from the configs alone (no rank, no device).

The trainer's MFU (trainer/flops.py), the automatic pipeline layout's cost model
(parallel/layout.py) and the planner (launch/plan.py) all count with these formulas.

Conventions, the ones MFU is defined with (PaLM, Megatron, DeepSeek):

- Only matrix multiplications count, a multiply-add is 2 FLOPs. Norms, activations,
  softmax, RoPE, the router's top-k, the embedding lookup, the merger's mean-pool and the
  bicubic resize of the position table are O(size) elementwise work and are left out.
- Forward + backward = 3 x forward: the backward of a matmul computes the gradient of its
  input and of its weight, each as costly as the forward. (The very first matmul of the
  vision encoder, whose input is pixels, needs no input gradient: that 1 x patch-embedding
  overcount is the convention's, and tiny.)
- Model FLOPs, not hardware FLOPs: recomputation (activation checkpointing, DEP's
  no-grad encoder forward before the recomputed one) is NOT counted, so MFU stays
  comparable across memory policies.

Attention costs what the mask lets a query see. Per query token and layer:

    scores  q.k  : 2 * heads * qk_head_dim * L
    values  p.v  : 2 * heads * v_head_dim  * L          L = keys the query attends to

In a packed LM row the mask is causal within each document, so L is the position inside
the document plus one (`attended_lengths`); a row holding one document of n tokens has a
mean L of (n + 1) / 2. A vision patch attends to every patch of its own item (all frames
of a chunk jointly), so L = t * h * w of the item.

    packed row (doc ids)   0 0 0 0 1 1 1 -1 -1
    attended length L      1 2 3 4 1 2 3  1  2        (padding, doc -1, is a document too:
                                                       it is computed, so it is counted)

A dense kernel fed the boolean mask (the CPU path) still multiplies all S x S pairs; pass
L = S to `lm_flops_per_token` to get what that kernel executes.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from model.config import LMConfig, ModelConfig

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class _Parts:
    """Forward FLOPs by part; `forward` sums every field."""

    @property
    def forward(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def forward_backward(self) -> float:
        return 3 * self.forward


@dataclass(frozen=True)
class LMFlops(_Parts):
    """Language-model forward FLOPs, per token or summed over a batch (see the function)."""

    mla_projections: float  # q_down, q_up, kv_down, kv_up, o_proj of every layer
    attention: float  # scores and values of every layer
    dense_ffn: float  # the SwiGLU of the first `first_k_dense` layers
    moe_router: float
    moe_experts: float  # the top_k routed experts a token goes to
    moe_shared: float
    head: float


@dataclass(frozen=True)
class VisionFlops(_Parts):
    """Vision encoder (MoonViT-3D + projector) forward FLOPs, per patch or summed over items."""

    patch_embedding: float
    block_linears: float  # qkv, out, MLP up and down of every block
    attention: float  # scores and values of every block
    projector: float  # fc1 and fc2, once per merged 2x2 (time-pooled) token


# ---------------------------------------------------------------- language model


def lm_part_flops(cfg: LMConfig, *, dense_layers: int, moe_layers: int, head: bool,
                  tokens: int | float, attended_total: int | float) -> LMFlops:
    """Forward FLOPs of part of the LM (e.g. one pipeline chunk) over `tokens` tokens whose
    attended lengths sum to `attended_total`: that many dense and MoE decoder layers, and the
    head if `head`. The embedding is a lookup: 0 FLOPs."""
    D, H = cfg.hidden, cfg.heads
    layers = dense_layers + moe_layers
    projections = (D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
                   + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                   + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
                   + H * cfg.v_head_dim * D)
    attention_per_key = H * (cfg.qk_head_dim + cfg.v_head_dim)
    swiglu_per_inner = 3 * D
    return LMFlops(
        mla_projections=2 * layers * projections * tokens,
        attention=2 * layers * attention_per_key * attended_total,
        dense_ffn=2 * dense_layers * swiglu_per_inner * cfg.dense_hidden * tokens,
        moe_router=2 * moe_layers * D * cfg.num_experts * tokens,
        moe_experts=2 * moe_layers * cfg.top_k * swiglu_per_inner * cfg.expert_hidden * tokens,
        moe_shared=(2 * moe_layers * swiglu_per_inner * cfg.expert_hidden
                    * cfg.num_shared_experts * tokens),
        head=2 * D * cfg.vocab_size * tokens if head else 0,
    )


def _lm_flops(cfg: LMConfig, tokens: int | float, attended_total: int | float) -> LMFlops:
    """Forward FLOPs of the whole LM (see `lm_part_flops`)."""
    return lm_part_flops(cfg, dense_layers=cfg.first_k_dense, moe_layers=cfg.num_moe_layers,
                         head=True, tokens=tokens, attended_total=attended_total)


def lm_flops_per_token(cfg: LMConfig, attended_length: float) -> LMFlops:
    """Forward FLOPs of one LM token that attends to `attended_length` keys in every layer.

    For a training sequence of one n-token document use (n + 1) / 2
    (`causal_mean_attended_length`); for packed rows use `lm_flops`, which is exact.
    """
    if attended_length < 1:
        raise ValueError(f"attended_length={attended_length} must be >= 1: a causal query "
                         "always attends to itself")
    return _lm_flops(cfg, 1, attended_length)


def causal_mean_attended_length(document_length: int) -> float:
    """Mean keys per query under a causal mask over one document of this many tokens."""
    if document_length < 1:
        raise ValueError(f"document_length={document_length} must be >= 1")
    return (document_length + 1) / 2


def attended_lengths(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """[B, S] int64: keys each query attends to under `model.mla.packed_causal_mask`.

    That is, the count of positions j <= i with doc_ids[j] == doc_ids[i] (documents need
    not be contiguous; padding, -1, is one more document). O(S log S) per row by a stable
    sort on the doc id, so it is cheap for long sequences, unlike summing the S x S mask.
    """
    if doc_ids_BS.dim() != 2:
        raise ValueError(f"doc_ids must be [B, S], got shape {tuple(doc_ids_BS.shape)}")
    B, S = doc_ids_BS.shape
    order_BS = torch.argsort(doc_ids_BS, dim=1, stable=True)  # by doc, then by position
    sorted_doc_BS = doc_ids_BS.gather(1, order_BS)
    index_BS = torch.arange(S, device=doc_ids_BS.device).expand(B, S)
    starts_doc = torch.ones(B, S, dtype=torch.bool, device=doc_ids_BS.device)
    starts_doc[:, 1:] = sorted_doc_BS[:, 1:] != sorted_doc_BS[:, :-1]
    doc_start_BS = torch.where(starts_doc, index_BS, torch.zeros_like(index_BS)).cummax(1).values
    lengths_BS = torch.empty_like(index_BS)
    lengths_BS.scatter_(1, order_BS, index_BS - doc_start_BS + 1)
    return lengths_BS


def lm_flops(cfg: LMConfig, doc_ids_BS: torch.Tensor) -> LMFlops:
    """Forward FLOPs of the LM over a packed batch, exact (Python ints)."""
    lengths_BS = attended_lengths(doc_ids_BS)
    return _lm_flops(cfg, lengths_BS.numel(), int(lengths_BS.sum()))


# ---------------------------------------------------------------- vision encoder


def _vision_linears(cfg: ModelConfig) -> tuple[int, int, int, int]:
    """(patch embedding, block linears of all blocks, attention per patch-key pair of all
    blocks, projector): multiply-adds per patch, pair or merged token."""
    v = cfg.vision
    D = v.hidden
    group = v.merge_kernel ** 2 * D
    block = D * 3 * D + D * D + 2 * D * v.mlp_hidden
    return (v.patch_dim * D, v.layers * block, v.layers * 2 * D,
            group * group + group * cfg.lm.hidden)


def vision_flops_per_patch(cfg: ModelConfig, item_patches: int, frames: int = 1) -> VisionFlops:
    """Forward FLOPs per patch of an item of `item_patches` = t*h*w patches and t = `frames`.

    Each patch attends to the whole item; the projector runs once per merged token, i.e.
    once per 2 x 2 x t patches, so its share per patch is 1 / (4 t).
    """
    if item_patches < 1 or not 1 <= frames <= cfg.vision.max_frames:
        raise ValueError(f"item_patches={item_patches} must be >= 1 and frames={frames} in "
                         f"1..{cfg.vision.max_frames} (model.vision.max_frames)")
    embed, blocks, attention_pair, projector = _vision_linears(cfg)
    return VisionFlops(2 * embed, 2 * blocks, 2 * attention_pair * item_patches,
                       2 * projector / (cfg.vision.merge_kernel ** 2 * frames))


def vision_flops(cfg: ModelConfig, grid_thw: Sequence[Grid]) -> VisionFlops:
    """Forward FLOPs of the encoder over these items (images t = 1, chunks t > 1), exact."""
    embed, blocks, attention_pair, projector = _vision_linears(cfg)
    kernel = cfg.vision.merge_kernel
    patches = pairs = merged = 0
    for index, (t, h, w) in enumerate(grid_thw):
        if t < 1 or h % kernel or w % kernel or h <= 0 or w <= 0:
            raise ValueError(f"grid_thw[{index}]={(t, h, w)}: t must be >= 1 and h, w positive "
                             f"multiples of model.vision.merge_kernel={kernel}")
        n = t * h * w
        patches += n
        pairs += n * n
        merged += (h // kernel) * (w // kernel)
    return VisionFlops(2 * embed * patches, 2 * blocks * patches, 2 * attention_pair * pairs,
                       2 * projector * merged)


def model_flops(cfg: ModelConfig, doc_ids_BS: torch.Tensor,
                grid_thw: Sequence[Grid] = ()) -> float:
    """Forward + backward model FLOPs of one microbatch: LM rows plus the media they hold."""
    return lm_flops(cfg.lm, doc_ids_BS).forward_backward + vision_flops(cfg, grid_thw).forward_backward
