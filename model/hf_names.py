"""Tensor names and layouts of the Hugging Face format <-> our global names (model/param_names.py).

    HF (DeepseekV3ForCausalLM, as published)          ours (global name)
    model.embed_tokens.weight                          lm.embed.weight
    model.layers.{i}.input_layernorm.weight            lm.layers.{i}.attn_norm.weight
    model.layers.{i}.self_attn.q_a_proj.weight         lm.layers.{i}.attn.q_down.weight
                  .self_attn.q_a_layernorm.weight                     .attn.q_norm.weight
                  .self_attn.q_b_proj.weight     (R)                  .attn.q_up.weight
                  .self_attn.kv_a_proj_with_mqa.weight (R)            .attn.kv_down.weight
                  .self_attn.kv_a_layernorm.weight                    .attn.kv_norm.weight
                  .self_attn.kv_b_proj.weight                         .attn.kv_up.weight
                  .self_attn.o_proj.weight                            .attn.o_proj.weight
                  .post_attention_layernorm.weight                    .ffn_norm.weight
                  .mlp.{gate,up,down}_proj.weight  (dense)            .ffn.{gate,up,down}.weight
                  .mlp.gate.weight                                    .ffn.router.weight
                  .mlp.gate.e_score_correction_bias                   .ffn.router.bias
                  .mlp.experts.{e}.{gate,up,down}_proj.weight         .ffn.experts.{e}.{gate,up,down}.weight
                  .mlp.shared_experts.{gate,up,down}_proj.weight      .ffn.shared.{gate,up,down}.weight
    model.norm.weight                                  lm.norm.weight
    lm_head.weight                                     lm.head.weight

(R): the rope rows. The published checkpoints lay each head's RoPE dims out interleaved
(pairs (0,1), (2,3), ... share an angle: `rope_interleave`), our `apply_rotary` rotates
halves (pairs (i, i + R/2)). Rotating pairs in one layout is rotating them in the other
after a fixed permutation of the rope dims, and q.k is invariant when q and k are
permuted alike, so importing permutes the rope OUTPUT rows of q_up (per head) and of
kv_down (its last R rows) by [0, 2, 4, ..., 1, 3, 5, ...]; exporting undoes it.

Kimi K2.5 checkpoints hold this LM under `language_model.` (`language_model.model.layers...`,
`language_model.lm_head.weight`) beside the vision tower and projector
(model/hf_vision_names.py); `name_to_ours` / `name_to_hf` and the tensor functions below
serve both layouts.
"""
from __future__ import annotations

import re

import torch

from model.config import LMConfig, ModelConfig
from model.hf_vision_names import is_vision_hf_name, vision_name_to_hf, vision_name_to_ours, \
    vision_tensor_to_hf, vision_tensor_to_ours

K25_LM_PREFIX = "language_model."

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_a_proj.weight": "attn.q_down.weight",
    "self_attn.q_a_layernorm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.q_up.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.kv_down.weight",
    "self_attn.kv_a_layernorm.weight": "attn.kv_norm.weight",
    "self_attn.kv_b_proj.weight": "attn.kv_up.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "mlp.gate_proj.weight": "ffn.gate.weight",
    "mlp.up_proj.weight": "ffn.up.weight",
    "mlp.down_proj.weight": "ffn.down.weight",
    "mlp.gate.weight": "ffn.router.weight",
    "mlp.gate.e_score_correction_bias": "ffn.router.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared.gate.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared.up.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared.down.weight",
}
_LAYER_BACK = {ours: hf for hf, ours in _LAYER.items()}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_OUR_LAYER = re.compile(r"lm\.layers\.(\d+)\.(.+)")
_OUR_EXPERT = re.compile(r"ffn\.experts\.(\d+)\.(gate|up|down)\.weight")
_TOP = {"model.embed_tokens.weight": "lm.embed.weight", "model.norm.weight": "lm.norm.weight",
        "lm_head.weight": "lm.head.weight"}
_TOP_BACK = {ours: hf for hf, ours in _TOP.items()}

ROPE_PERMUTED = ("attn.q_up.weight", "attn.kv_down.weight")


class UnknownTensor(KeyError):
    """A tensor name the converter has no mapping for."""


def lm_name_to_ours(hf_name: str, cfg: LMConfig) -> str | None:
    """Our global name of an HF LM tensor (without any `language_model.` prefix); None for
    the tensors we deliberately skip (MTP layers beyond `cfg.layers`)."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    m = _HF_LAYER.fullmatch(hf_name)
    if m is None:
        raise UnknownTensor(hf_name)
    index, rest = int(m.group(1)), m.group(2)
    if index >= cfg.layers:
        return None  # multi-token-prediction layers (DeepSeek-V3's layer 61): not imported
    e = _HF_EXPERT.fullmatch(rest)
    if e is not None:
        return f"lm.layers.{index}.ffn.experts.{e.group(1)}.{e.group(2)}.weight"
    if rest not in _LAYER:
        raise UnknownTensor(hf_name)
    return f"lm.layers.{index}.{_LAYER[rest]}"


def lm_name_to_hf(name: str) -> str:
    """The HF name of one of our LM global names (the inverse of `lm_name_to_ours`)."""
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    m = _OUR_LAYER.fullmatch(name)
    if m is None:
        raise UnknownTensor(name)
    index, rest = m.group(1), m.group(2)
    e = _OUR_EXPERT.fullmatch(rest)
    if e is not None:
        return f"model.layers.{index}.mlp.experts.{e.group(1)}.{e.group(2)}_proj.weight"
    if rest not in _LAYER_BACK:
        raise UnknownTensor(name)
    return f"model.layers.{index}.{_LAYER_BACK[rest]}"


def interleaved_to_half(rope: int) -> torch.Tensor:
    """Row order that takes interleaved rope dims to rotate-half ones: [0, 2, ..., 1, 3, ...]."""
    return torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])


def _rope_rows(name: str, cfg: LMConfig) -> tuple[int, int, int] | None:
    """(groups, rows per group, first rope row in a group) of a tensor with rope rows."""
    if name.endswith(ROPE_PERMUTED[0]):
        return cfg.heads, cfg.qk_head_dim, cfg.qk_nope_head_dim
    if name.endswith(ROPE_PERMUTED[1]):
        return 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank
    return None


def _permute_rope_rows(name: str, w: torch.Tensor, cfg: LMConfig, order: torch.Tensor
                       ) -> torch.Tensor:
    rows = _rope_rows(name, cfg)
    if rows is None:
        return w
    groups, per_group, first = rows
    if w.shape[0] != groups * per_group:
        raise ValueError(f"{name}: {w.shape[0]} rows, expected {groups} x {per_group}")
    grouped = w.reshape(groups, per_group, *w.shape[1:])
    index = torch.cat([torch.arange(first), first + order])
    return grouped.index_select(1, index).reshape(w.shape)


def lm_tensor_to_ours(name: str, w: torch.Tensor, cfg: LMConfig, interleaved: bool
                      ) -> torch.Tensor:
    """HF layout -> ours for our global `name` (rope rows permuted when `interleaved`)."""
    if not interleaved:
        return w
    return _permute_rope_rows(name, w, cfg, interleaved_to_half(cfg.qk_rope_head_dim))


def lm_tensor_to_hf(name: str, w: torch.Tensor, cfg: LMConfig) -> torch.Tensor:
    """Ours -> the published (interleaved) layout: the inverse permutation."""
    return _permute_rope_rows(name, w, cfg,
                              torch.argsort(interleaved_to_half(cfg.qk_rope_head_dim)))


def name_to_ours(hf_name: str, cfg: ModelConfig, k25: bool) -> str | None:
    """Our global name of any tensor of a DeepseekV3 (`k25` False) or Kimi K2.5 checkpoint;
    None for deliberately skipped ones; UnknownTensor for names without a counterpart."""
    if not k25:
        return lm_name_to_ours(hf_name, cfg.lm)
    if hf_name.startswith(K25_LM_PREFIX):
        return lm_name_to_ours(hf_name[len(K25_LM_PREFIX):], cfg.lm)
    ours = vision_name_to_ours(hf_name) if is_vision_hf_name(hf_name) else None
    if ours is None:
        raise UnknownTensor(hf_name)
    return ours


def name_to_hf(name: str, k25: bool) -> str:
    """The inverse of `name_to_ours` for the layout chosen by `k25`."""
    if name.startswith("lm."):
        return (K25_LM_PREFIX if k25 else "") + lm_name_to_hf(name)
    hf = vision_name_to_hf(name) if k25 else None
    if hf is None:
        raise UnknownTensor(name)
    return hf


def tensor_to_ours(name: str, w: torch.Tensor, cfg: ModelConfig, interleaved: bool
                   ) -> torch.Tensor:
    """HF layout -> ours for our global `name` (LM or vision)."""
    if name.startswith("vision."):
        return vision_tensor_to_ours(name, w, cfg.vision)
    return lm_tensor_to_ours(name, w, cfg.lm, interleaved)


def tensor_to_hf(name: str, w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Ours -> the published layout for our global `name` (LM or vision)."""
    if name.startswith("vision."):
        return vision_tensor_to_hf(name, w, cfg.vision)
    return lm_tensor_to_hf(name, w, cfg.lm)
