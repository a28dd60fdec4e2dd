"""Analytic FLOPs against torch's FlopCounterMode on the instantiated models.

FlopCounterMode counts matmuls (mm, addmm, bmm) and the fused attention ops it knows.
Two facts shape these tests:

- CPU's fused SDPA kernel (`_scaled_dot_product_flash_attention_for_cpu`) is not in its
  table and would count 0, so every count runs under the MATH backend, whose q.k and p.v
  are plain bmm's.
- The LM feeds SDPA a boolean [S, S] mask; the math kernel still multiplies every pair,
  so the counted attention is the DENSE S x S cost (`lm_flops_per_token(cfg, S)`). The
  masked cost (`lm_flops`) is checked against the number of True entries of the model's
  own mask instead. The vision encoder runs one unmasked SDPA per item, so there the
  count is exactly the per-item cost.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from model.config import preset
from model.ffn import SwiGLU
from model.init import initialize
from model.lm import LanguageModelChunk
from model.attention import DocumentMask, packed_causal_mask
from model.mla import MLA
from model.rope import RotaryEmbedding
from model.param_count import count
from model.vision_language import VisionEncoder
from model import flops
from trainer import flops as mfu_flops

torch.set_num_threads(1)

ROOT = "LanguageModelChunk"


@register_flop_formula(torch.ops.aten._grouped_mm)
def grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """FlopCounterMode does not know the grouped GEMM of the experts: 2 x multiply-adds.
    [M, K] x [G, K, N] (forward, input grad): every row meets one K x N matrix.
    [K, M] x [M, N] -> [G, K, N] (weight grad): the M rows split over the G groups."""
    if len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def counted(fn):
    """(FlopCounterMode's per-module counts, its global total) of fn() under the math SDPA."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: {str(op): n for op, n in ops.items()}
                  for name, ops in counter.get_flop_counts().items()}
    return per_module, counter.get_total_flops()


def packed_batch(cfg, generator):
    """Two rows of 24 tokens: several documents, and padding (doc -1) at the end of one row."""
    rows = [[5, 9, 3, 7], [11, 8, 2, 3]]  # document lengths; the last 3 of row 1 are padding
    doc_ids, positions = [], []
    for lengths in rows:
        doc_ids.append(torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)]))
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
    doc_ids_BS, positions_BS = torch.stack(doc_ids), torch.stack(positions)
    doc_ids_BS[1, -3:] = -1
    tokens_BS = torch.randint(4, cfg.vocab_size, doc_ids_BS.shape, generator=generator)
    return tokens_BS, positions_BS, doc_ids_BS


def counted_lm_parts(per_module, cfg) -> dict[str, int]:
    """FlopCounterMode's counts regrouped into the parts of `flops.LMFlops`."""
    parts = dict.fromkeys(["mla_projections", "attention", "dense_ffn", "moe_router",
                           "moe_experts", "moe_shared", "head"], 0)
    for i in range(cfg.layers):
        layer = f"{ROOT}.layers.{i}"
        # the layer runs its pieces as memory-policy regions (model/lm.py): q_down and
        # kv_down in its norm region, then MLA.attend, the router's scores beside the FFN
        # norm; so MLA's counts are the layer's mm's besides those of the FFN's modules
        # (projections are mm, SDPA is bmm, and no FFN module has a bmm)
        if i < cfg.first_k_dense:
            ffn_parts = {"dense_ffn": per_module[f"{layer}.ffn"]}
        else:
            ffn_parts = {"moe_router": per_module[f"{layer}.ffn.router"],
                         "moe_shared": per_module.get(f"{layer}.ffn.shared", {}),
                         "moe_experts": per_module[f"{layer}.ffn.experts"]}
        for part, ops in ffn_parts.items():
            assert "aten.bmm" not in ops, ops
            parts[part] += sum(ops.values())
        parts["mla_projections"] += per_module[layer]["aten.mm"] - sum(
            ops.get("aten.mm", 0) for ops in ffn_parts.values())
        parts["attention"] += per_module[layer]["aten.bmm"]
    parts["head"] = sum(per_module[f"{ROOT}.head"].values())
    return parts


LM_VARIANTS = {
    "tiny": {},
    "two_dense_two_shared_top3": dict(first_k_dense=2, num_shared_experts=2, top_k=3),
    "all_moe_no_shared": dict(first_k_dense=0, num_shared_experts=0),
}


@pytest.mark.parametrize("variant", sorted(LM_VARIANTS))
def test_lm_forward_and_backward_match_flop_counter(variant):
    cfg = dataclasses.replace(preset("tiny").lm, **LM_VARIANTS[variant])
    lm = LanguageModelChunk(cfg)
    initialize(lm, seed=0)
    tokens_BS, positions_BS, doc_ids_BS = packed_batch(cfg, torch.Generator().manual_seed(0))
    B, S = doc_ids_BS.shape
    logits = []
    per_module, forward_total = counted(
        lambda: logits.append(lm(tokens_BS, positions_BS, doc_ids_BS)))

    dense_kernel = flops.lm_flops_per_token(cfg, attended_length=S)
    expected = {f.name: getattr(dense_kernel, f.name) * B * S
                for f in dataclasses.fields(flops.LMFlops)}
    assert counted_lm_parts(per_module, cfg) == expected  # exact, part by part
    assert forward_total == dense_kernel.forward * B * S
    assert expected["moe_experts"] > 0  # the MoE layers ran

    # masked cost: the model's own mask decides what each query really needs
    masked = flops.lm_flops(cfg, doc_ids_BS)
    true_pairs = int(packed_causal_mask(doc_ids_BS).sum())
    assert masked.attention * (B * S * S) == expected["attention"] * true_pairs
    assert masked.forward - masked.attention == forward_total - expected["attention"]

    # backward = gradient of every matmul's input and weight = 2 x forward
    loss = F.cross_entropy(logits[0].flatten(0, 1), tokens_BS.flatten())
    _, backward_total = counted(loss.backward)
    assert backward_total == 2 * forward_total
    assert forward_total + backward_total == dense_kernel.forward_backward * B * S


def test_vision_forward_and_backward_match_flop_counter():
    cfg = preset("tiny")
    encoder = VisionEncoder(cfg)
    initialize(encoder, seed=0, prefix="vision")
    grids = [(1, 4, 6), (1, 2, 2), (4, 2, 4), (2, 6, 2)]  # two images, two video chunks
    patches = sum(t * h * w for t, h, w in grids)
    pixels_NP = torch.randn(patches, cfg.vision.patch_dim, generator=torch.Generator().manual_seed(0))

    out = []
    per_module, forward_total = counted(lambda: out.append(encoder(pixels_NP, grids)))
    assert out[0].shape == (sum(h * w // 4 for _, h, w in grids), cfg.lm.hidden)
    expected = flops.vision_flops(cfg, grids)
    assert forward_total == expected.forward
    assert sum(per_module["VisionEncoder.vit.patch_embed"].values()) == expected.patch_embedding
    assert sum(per_module["VisionEncoder.projector"].values()) == expected.projector
    block_attention = sum(per_module[f"VisionEncoder.vit.blocks.{i}.attn"].get("aten.bmm", 0)
                          for i in range(cfg.vision.layers))
    assert block_attention == expected.attention

    # The pixels need no gradient, so the patch embedding's backward is the weight gradient
    # alone: the one place where backward falls short of 2 x forward.
    _, backward_total = counted(lambda: out[0].square().mean().backward())
    assert backward_total == 2 * forward_total - expected.patch_embedding

    # per-patch view adds up to the batch view
    per_patch_sum = sum(t * h * w * flops.vision_flops_per_patch(cfg, t * h * w, frames=t).forward
                        for t, h, w in grids)
    assert per_patch_sum == pytest.approx(expected.forward, rel=1e-12)


def test_attended_lengths_equal_rows_of_the_model_mask():
    gen = torch.Generator().manual_seed(3)
    contiguous = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [4, 4, 4, 4, 4, 4, 4, 4]])
    scattered = torch.randint(-1, 3, (3, 17), generator=gen)  # docs need not be contiguous
    for doc_ids_BS in (contiguous, scattered):
        expected = packed_causal_mask(doc_ids_BS)[:, 0].sum(-1)
        assert torch.equal(flops.attended_lengths(doc_ids_BS), expected)
    assert flops.attended_lengths(contiguous)[0].tolist() == [1, 2, 3, 1, 2, 1, 1, 2]
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        flops.attended_lengths(torch.zeros(5, dtype=torch.long))


def test_one_document_per_row_uses_the_mean_causal_length():
    cfg = preset("small").lm
    n = 40
    whole = flops.lm_flops(cfg, torch.zeros(3, n, dtype=torch.long))
    per_token = flops.lm_flops_per_token(cfg, flops.causal_mean_attended_length(n))
    assert whole.forward == pytest.approx(3 * n * per_token.forward, rel=1e-12)
    assert whole.attention == pytest.approx(3 * n * per_token.attention, rel=1e-12)
    with pytest.raises(ValueError, match="attended_length"):
        flops.lm_flops_per_token(cfg, 0)


def norm_params(lm) -> int:
    """1-D weights that `param_count` calls active but that multiply nothing."""
    return lm.layers * (2 * lm.hidden + lm.q_lora_rank + lm.kv_lora_rank) + lm.hidden


@pytest.mark.parametrize("name", ["tiny", "small", "k25"])
def test_non_attention_flops_are_twice_the_active_matrix_params(name):
    lm = preset(name).lm
    active = count(preset(name)).lm_active
    per_token = flops.lm_flops_per_token(lm, attended_length=1)
    assert per_token.forward - per_token.attention == 2 * (active - norm_params(lm))


def test_k25_per_token_numbers_are_sane():
    cfg = preset("k25")
    per_token = flops.lm_flops_per_token(cfg.lm, flops.causal_mean_attended_length(8192))
    # Kimi K2 publishes 32B activated parameters: ~64 GFLOP per token forward besides attention
    assert 62e9 < per_token.forward - per_token.attention < 68e9
    # MLA attends with 64 heads of (192 + 128) dims over ~4096 keys in 61 layers: ~10 GFLOP
    assert 9e9 < per_token.attention < 11e9
    assert per_token.forward_backward == 3 * per_token.forward
    # the routed experts dominate the MoE; the router is a rounding error
    assert per_token.moe_experts > 10 * per_token.moe_router
    # MoonViT (SigLIP-SO-400M, ~0.4B params): ~0.8 GFLOP per patch of a 1024-patch image
    vit = flops.vision_flops_per_patch(cfg, item_patches=32 * 32)
    assert 0.7e9 < vit.forward - vit.attention < 1.0e9


def test_k25_attention_and_expert_formulas_match_flop_counter_on_meta_modules():
    """At the real k25 widths (64 heads, 7168 hidden, YaRN), on meta tensors: no memory."""
    cfg = preset("k25").lm
    S = 32
    with torch.device("meta"):
        mla, expert = MLA(cfg), SwiGLU(cfg.hidden, cfg.expert_hidden)
        x_BSD = torch.empty(1, S, cfg.hidden)
        mask = DocumentMask(torch.zeros(1, S, dtype=torch.long))  # one document: every pair
    rope = tuple(t.to("meta") for t in RotaryEmbedding(cfg)(torch.arange(S).unsqueeze(0)))
    _, mla_total = counted(lambda: mla(x_BSD, rope, mask))
    per_token = flops.lm_flops_per_token(cfg, attended_length=S)
    assert mla_total * cfg.layers == (per_token.mla_projections + per_token.attention) * S
    _, expert_total = counted(lambda: expert(x_BSD))
    assert expert_total * cfg.num_moe_layers * cfg.top_k == per_token.moe_experts * S


def test_throughput_and_mfu():
    assert mfu_flops.achieved_tflops(3e12, 1.5) == pytest.approx(2.0)
    assert mfu_flops.mfu(494.5, 989.0) == pytest.approx(0.5)
    assert mfu_flops.throughput_metrics(1e12, 1.0, None) == {"tflops": pytest.approx(1.0)}
    assert mfu_flops.throughput_metrics(312e12, 2.0, 312.0) == {
        "tflops": pytest.approx(156.0), "mfu": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="seconds"):
        mfu_flops.achieved_tflops(1e12, 0.0)
    with pytest.raises(ValueError, match="peak_tflops"):
        mfu_flops.mfu(1.0, 0.0)


@pytest.mark.parametrize("device_name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA H100 NVL", None), ("Tesla T4", None)])
def test_peak_lookup_by_cuda_device_name(device_name, peak):
    assert mfu_flops.peak_tflops_for(device_name) == peak


def test_no_peak_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert mfu_flops.device_peak_tflops() is None
