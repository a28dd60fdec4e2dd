"""transformer-engine kernels behind our module interfaces (`--model.te true`, CUDA only).

The one place that imports transformer-engine, lazily, on first use on a CUDA tensor:
the CPU path never imports it (CI has no TE: its wheels need CUDA libraries). What it
supplies, each a drop-in for one of our functions:

    document_attention / segment_attention   TE's fused attention, THD layout with
                                             cu_seqlens (padding_causal / padding), MLA's
                                             different q/k (192) and v (128) head dims
    norm_linear(norm, linear, x)             TE's fused RMSNorm/LayerNorm + Linear
                                             (LayerNormLinear) for the norm -> projection
                                             pairs with one consumer: MLA's q_norm -> q_up
                                             and kv_norm -> kv_up, the vision blocks'
                                             attn_norm -> qkv and mlp_norm -> up

Parameter names stay ours: the TE module of a pair is built once per pair, kept outside
the module tree (so optimizers, checkpoints and `named_parameters` never see it), and its
weights are OUR parameters (re-registered on it), so TE and plain torch read and update
the same tensors.

Known limit: written against transformer-engine 2.x; this session had no GPU, so it has
run only where `benchmarks/gpu_check.sh` ran it (its table compares TE with the plain
modules numerically).
"""
from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache
def _te():
    try:
        import transformer_engine.pytorch as te
    except ImportError as e:  # pragma: no cover - GPU machines only
        raise RuntimeError("model.te=true needs transformer-engine: pip install -e '.[gpu]' on a "
                           f"machine with CUDA ({e})") from e
    return te


def available() -> bool:
    try:
        _te()
    except RuntimeError:
        return False
    return True


@functools.cache
def _attention(heads: int, qk_dim: int, v_dim: int, mask_type: str, scale: float | None):
    te = _te()
    return te.DotProductAttention(heads, kv_channels=(qk_dim, v_dim), qkv_format="thd",
                                  attn_mask_type=mask_type, softmax_scale=scale)


def _thd_attention(q_NHD, k_NHD, v_NHV, cu_seqlens, longest, mask_type, scale):
    heads, qk_dim, v_dim = q_NHD.shape[1], q_NHD.shape[2], v_NHV.shape[2]
    attention = _attention(heads, qk_dim, v_dim, mask_type, scale)
    out = attention(q_NHD, k_NHD, v_NHV, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                    max_seqlen_q=longest, max_seqlen_kv=longest)
    return out.view(q_NHD.shape[0], heads, v_dim)


def document_attention(q_BHSQ, k_BHSQ, v_BHSV, cu_seqlens, longest: int, scale: float):
    B, H, S, _ = q_BHSQ.shape
    q, k, v = (t.transpose(1, 2).reshape(B * S, H, t.shape[-1]) for t in (q_BHSQ, k_BHSQ, v_BHSV))
    out = _thd_attention(q, k, v, cu_seqlens, longest, "padding_causal", scale)
    return out.reshape(B, S, H, -1).transpose(1, 2)


def segment_attention(q_NHD, k_NHD, v_NHD, cu_seqlens, longest: int):
    return _thd_attention(q_NHD, k_NHD, v_NHD, cu_seqlens, longest, "padding", None)


def norm_then_linear(norm: nn.Module, linear: nn.Linear, x: torch.Tensor, te: bool) -> torch.Tensor:
    """linear(norm(x)); fused by TE when `te` and x is on CUDA."""
    if te and x.is_cuda:
        return norm_linear(norm, linear, x)
    return linear(norm(x))


def norm_linear(norm: nn.Module, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(norm(x)) through one fused TE kernel, with `norm`'s and `linear`'s parameters."""
    cache = linear.__dict__.setdefault("_te_norm_linear", {})
    fused = cache.get(id(norm))
    if fused is None:
        te = _te()
        kind = "RMSNorm" if isinstance(norm, nn.RMSNorm) else "LayerNorm"
        fused = te.LayerNormLinear(linear.in_features, linear.out_features,
                                   bias=linear.bias is not None, eps=norm.eps,
                                   normalization=kind, device=x.device, params_dtype=x.dtype)
        fused.register_parameter("layer_norm_weight", norm.weight)
        if kind == "LayerNorm":
            fused.register_parameter("layer_norm_bias", norm.bias)
        fused.register_parameter("weight", linear.weight)
        if linear.bias is not None:
            fused.register_parameter("bias", linear.bias)
        cache[id(norm)] = fused
    return fused(x)
