"""Tensor names and layouts of the published Kimi K2.5 vision tower + projector <-> ours.

    published (moonshotai/Kimi-K2.5 safetensors)        ours (global name)
    vision_tower.patch_embed.proj.{weight,bias}    (C)  vision.vit.patch_embed.{weight,bias}
    vision_tower.patch_embed.pos_emb.weight             vision.vit.pos_emb.weight_HWD
    vision_tower.encoder.blocks.{i}.norm0.*             vision.vit.blocks.{i}.attn_norm.*
                                   .wqkv.*         (P)                      .attn.qkv.*
                                   .wo.*                                    .attn.out.*
                                   .norm1.*                                 .mlp_norm.*
                                   .mlp.fc0.*                               .mlp.up.*
                                   .mlp.fc1.*                               .mlp.down.*
    vision_tower.encoder.final_layernorm.*              vision.vit.final_norm.*
    mm_projector.pre_norm.*                             vision.projector.norm.*
    mm_projector.proj.0.*                               vision.projector.fc1.*
    mm_projector.proj.2.*                               vision.projector.fc2.*

(These are the names of the release and of Moonshot's and vLLM's code; transformers 5
renames them on load: norm0/norm1 -> norm1/norm2, wqkv -> q/k/v_proj, blocks -> layers.)

(C): a Conv2d weight [D, C, p, p] in the release, our Linear [D, C*p*p]: the same numbers,
since our patch rows are the (channel, y, x)-flattened pixels; a reshape either way.

(P): the 2D RoPE pair order. Both rotate adjacent pairs (2i, 2i+1) of a head, pairs 2j and
2j+1 sharing frequency j; the release gives pair 2j the COLUMN angle and 2j+1 the row angle,
ours (model/vision.py `rope_2d_angles`) the row angle first. Swapping the two pairs of every
group of four dims of q and k turns one into the other, and q.k is unchanged when q and k
are permuted alike, so the swap is done on the q and k rows of wqkv (weight and bias) here
instead of a switch in the encoder: element i of a head <-> element i XOR 2 (its own
inverse, so import and export apply the same index). v rows are not rotated: untouched.

The other published constants our encoder must agree with are checked on the config
(model/hf_config.py): LayerNorm eps 1e-5 (our `vision.norm_eps`), GELU-tanh in the blocks
and exact GELU in the projector (ours, fixed), the projector's eps 1e-5, 2x2 merging with
temporal mean-pooling, bicubic resizing of a square position table.
"""
from __future__ import annotations

import re

import torch

from model.config import VisionConfig

_BLOCK = {
    "norm0": "attn_norm", "norm1": "mlp_norm", "wqkv": "attn.qkv", "wo": "attn.out",
    "mlp.fc0": "mlp.up", "mlp.fc1": "mlp.down",
}
_BLOCK_BACK = {ours: hf for hf, ours in _BLOCK.items()}
_TOP = {
    "vision_tower.patch_embed.proj": "vision.vit.patch_embed",
    "vision_tower.encoder.final_layernorm": "vision.vit.final_norm",
    "mm_projector.pre_norm": "vision.projector.norm",
    "mm_projector.proj.0": "vision.projector.fc1",
    "mm_projector.proj.2": "vision.projector.fc2",
}
_TOP_BACK = {ours: hf for hf, ours in _TOP.items()}
_POS_EMB = ("vision_tower.patch_embed.pos_emb.weight", "vision.vit.pos_emb.weight_HWD")
_HF_BLOCK = re.compile(r"vision_tower\.encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)")
_OUR_BLOCK = re.compile(r"vision\.vit\.blocks\.(\d+)\.(.+)\.(weight|bias)")
_LEAF = re.compile(r"(.+)\.(weight|bias)")
VISION_PREFIXES = ("vision_tower.", "mm_projector.")


def is_vision_hf_name(hf_name: str) -> bool:
    return hf_name.startswith(VISION_PREFIXES)


def vision_name_to_ours(hf_name: str) -> str | None:
    """Our global name of a published vision tower / projector tensor; None if unknown."""
    if hf_name == _POS_EMB[0]:
        return _POS_EMB[1]
    m = _HF_BLOCK.fullmatch(hf_name)
    if m is not None:
        index, module, leaf = m.groups()
        return f"vision.vit.blocks.{index}.{_BLOCK[module]}.{leaf}" if module in _BLOCK else None
    m = _LEAF.fullmatch(hf_name)
    if m is not None and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    return None


def vision_name_to_hf(name: str) -> str | None:
    """The published name of one of our vision global names; None if unknown."""
    if name == _POS_EMB[1]:
        return _POS_EMB[0]
    m = _OUR_BLOCK.fullmatch(name)
    if m is not None:
        index, module, leaf = m.groups()
        return (f"vision_tower.encoder.blocks.{index}.{_BLOCK_BACK[module]}.{leaf}"
                if module in _BLOCK_BACK else None)
    m = _LEAF.fullmatch(name)
    if m is not None and m.group(1) in _TOP_BACK:
        return f"{_TOP_BACK[m.group(1)]}.{m.group(2)}"
    return None


def rope_pair_swap(head_dim: int) -> torch.Tensor:
    """Index of a head's dims that swaps the row- and column-angle pairs: i -> i XOR 2."""
    return torch.arange(head_dim) ^ 2


def _swap_qk_pairs(w: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """wqkv rows [q heads | k heads | v heads]: every q and k head's dims pair-swapped."""
    if w.shape[0] != 3 * cfg.hidden:
        raise ValueError(f"wqkv has {w.shape[0]} rows, expected 3 x {cfg.hidden}")
    qkv = w.reshape(3, cfg.heads, cfg.head_dim, *w.shape[1:])
    qk = qkv[:2].index_select(2, rope_pair_swap(cfg.head_dim))
    return torch.cat([qk, qkv[2:]]).reshape(w.shape)


def vision_tensor_to_ours(name: str, w: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """Published layout -> ours for our global `name`."""
    if name == "vision.vit.patch_embed.weight":
        return w.reshape(w.shape[0], -1)
    if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
        return _swap_qk_pairs(w, cfg)
    return w


def vision_tensor_to_hf(name: str, w: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """Ours -> the published layout (the inverse of `vision_tensor_to_ours`)."""
    if name == "vision.vit.patch_embed.weight":
        return w.reshape(w.shape[0], cfg.in_channels, cfg.patch_size, cfg.patch_size)
    if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
        return _swap_qk_pairs(w, cfg)
    return w
