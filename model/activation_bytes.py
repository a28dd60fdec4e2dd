"""What autograd saves for backward in our modules, tensor by tensor: the activation model.

The planner (trainer/planner.py) multiplies these bytes by the microbatches a pipeline
rank holds in flight; a test (tests/model/test_activation_bytes.py) holds them to what
`torch.autograd.graph.saved_tensors_hooks` sees in the running modules. Every entry is
one tensor a forward produces and some op saves (a storage shared by several ops, such
as `v` viewing `kv_up`'s output, is one entry), named after the module that makes it,
so a memory policy (recompute, FP8, offload: issue 15) can drop or shrink entries by
name and the planner shows the difference:

    LM chunk, T = B x S tokens, R = expert rows this rank receives (T x K at ep = 1)
    rope: cos, sin [T, rope_dim]  (computed once per chunk, shared by every layer)
    decoder layer                               MLA (dense attention: the CPU path)
    input ─ attn_norm ──┬─ q_down ─ q_norm ─ q_up ─┬─ rope ─ q ──┐
    [T,D]  rstd, x*rstd │                          │             ├ probs [B,H,S,S] ─ o_proj
           out          └─ kv_down ─ kv_norm ─ kv_up(k_nope | v) ┘           input [T,H*dv]
    residual ─ ffn_norm ─┬─ router: scores [T,E], top-k, chosen, sum (fp32)
                         ├─ dispatch: source token [T*K] ─> experts (grouped GEMMs):
                         │   input [R,D], gate, up, silu, gate*up [R,I], out [R,D]
                         │   ─> combine: order, weights, token [T*K]; weighted rows
                         │      [T*K,D] scatter-added into [T,D]
                         └─ shared expert: gate, up, silu, gate*up [T,I_s]
    head: input, norm (rstd, x*rstd), loss: grad_hidden [T,D], grad_weight [V,D] fp32

Parameters (and views of them, such as `weight.t()` inside a linear) are not activations
and are never listed (parallel/activation_memory.py does not count them either).
Scalars and per-call bookkeeping under 1 KiB (cu_seqlens, RNG state) are left out.

Attention kernels (`ActivationSpec.attention`), as model/attention.py picks them:
    "dense"  the CPU path, checked against the running modules. LM rows: SDPA's math path
             (explicit document mask, unequal q/v head dims) saves the scaled q, k^T and
             the softmax probabilities [B, H, S, S]. Media: one batched SDPA per distinct
             item length (CPU flash kernel, no mask), saving gathered copies of q, k, v,
             its output and the fp32 log-sum-exp, then the scatter back to packed order.
    "flash"  the CUDA bf16 path: `varlen_attn` over the packed segments saves its q, k, v
             inputs, its output and the fp32 log-sum-exp [H, T]; MLA's values are
             zero-padded to the q/k head dim (so v and the output are that wide). Not
             measured here (no GPU): read from the kernel's autograd context
             (torch.nn.attention.varlen._setup_context) and the model code. TE's fused
             attention (`te=True`) and fp32 on CUDA (SDPA with the dense mask, on
             whichever backend CUDA picks) are not modelled separately.

Precision (`ActivationSpec.compute_bytes`): 4 for fp32 (checked), 2 for bf16, where the
router scores, normalisation statistics, the log-sum-exp and the loss's weight gradient
stay fp32 and the router's fp32 copies of its input and weight are saved too (the
mixed-precision recipe of issue 12; bf16 entries follow that recipe and are not checked
until it lands).

Known limits: the expert rows a rank receives are taken as T x top_k, i.e. perfectly
balanced routing (a rank whose experts get more tokens saves proportionally more:
scale `routed_rows`); normalisation layers are the composite `nn.RMSNorm`, which saves
x * rstd besides x and rstd (a fused kernel would not); the combine's `index_add` keeps
its weighted source rows [T*K, D] (autograd saves it for its shape), and the all-to-all
dispatcher's `index_copy` (ungroup) keeps the experts' output, one [R, D] copy more than
the single-process dispatcher. The fused loss keeps a head-weight-sized fp32 gradient
per microbatch (model/loss.py), whatever the microbatch's size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from model.config import LMConfig, ModelConfig
from model.lm import ChunkSpec

FP32, INT64, INT32, BOOL = 4, 8, 4, 1
ATTENTION_KERNELS = ("dense", "flash")

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class Saved:
    """One tensor kept for backward: `numel` elements of `itemsize` bytes."""

    name: str
    numel: int
    itemsize: int

    @property
    def bytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class ActivationSpec:
    """How activations are stored: the compute dtype's size, the attention kernel and the
    expert dispatcher ("all_to_all": parallel/expert_dispatch.py, which the distributed
    engine uses at any ep; "local": model/dispatcher.py, the single-process engine's)."""

    compute_bytes: int = 4  # 4: fp32, 2: bf16
    attention: str = "dense"
    dispatcher: str = "all_to_all"

    def __post_init__(self) -> None:
        if self.compute_bytes not in (2, 4):
            raise ValueError(f"compute_bytes={self.compute_bytes}: 4 (fp32) or 2 (bf16)")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention={self.attention!r}: one of {ATTENTION_KERNELS}")
        if self.dispatcher not in ("all_to_all", "local"):
            raise ValueError(f"dispatcher={self.dispatcher!r}: all_to_all or local")


def total_bytes(entries: Sequence[Saved]) -> int:
    return sum(e.bytes for e in entries)


def _prefixed(prefix: str, entries: list[Saved]) -> list[Saved]:
    return [Saved(f"{prefix}.{e.name}", e.numel, e.itemsize) for e in entries]


def rms_norm(rows: int, dim: int, spec: ActivationSpec) -> list[Saved]:
    """nn.RMSNorm's own products (its input belongs to whoever made it): the fp32 rstd,
    x * rstd (for the scale's gradient) and the output (the next matmul's input)."""
    c = spec.compute_bytes
    return [Saved("rstd", rows, FP32), Saved("normalized", rows * dim, c),
            Saved("out", rows * dim, c)]


def swiglu(rows: int, inner: int, spec: ActivationSpec) -> list[Saved]:
    """down(silu(gate(x)) * up(x)): the input belongs to the caller."""
    c = spec.compute_bytes
    return [Saved(n, rows * inner, c) for n in ("gate", "up", "silu", "product")]


def mla(cfg: LMConfig, batch: int, seq_len: int, spec: ActivationSpec) -> list[Saved]:
    """model/mla.py after the attention norm, up to o_proj's input (the rotary tables are
    the chunk's: `lm_chunk`)."""
    T, H, c = batch * seq_len, cfg.heads, spec.compute_bytes
    Q, V = cfg.qk_head_dim, cfg.v_head_dim
    out = [Saved("q_down.out", T * cfg.q_lora_rank, c),
           *_prefixed("q_norm", rms_norm(T, cfg.q_lora_rank, spec)),
           Saved("kv_down.out", T * (cfg.kv_lora_rank + cfg.qk_rope_head_dim), c),
           *_prefixed("kv_norm", rms_norm(T, cfg.kv_lora_rank, spec))]
    kv_up = Saved("kv_up.out", T * H * (cfg.qk_nope_head_dim + V), c)  # [k_nope | v]
    if spec.attention == "dense":  # SDPA's math path: scaled q, k^T, probabilities, v
        out += [Saved("q", T * H * Q, c), Saved("k", T * H * Q, c),
                # v is a strided view of kv_up's output; with B > 1 the math path's bmm
                # copies it to [B*H, S, dv]
                Saved("v", T * H * V, c) if batch > 1 else kv_up,
                Saved("probs", batch * H * seq_len * seq_len, c),
                Saved("o_proj.input", T * H * V, c)]
    else:  # varlen_attn's inputs (the concatenated q, k), output and log-sum-exp
        out += [Saved("q", T * H * Q, c), Saved("k", T * H * Q, c)]
        if V != Q:  # v zero-padded to Q, the output sliced back by a copy: o_proj's input
            out += [Saved("v_padded", T * H * Q, c), Saved("out_padded", T * H * Q, c),
                    Saved("lse", H * T, FP32), Saved("o_proj.input", T * H * V, c)]
        else:  # v views kv_up's output; o_proj reads the kernel's output
            out += [kv_up, Saved("o_proj.input", T * H * V, c), Saved("lse", H * T, FP32)]
    return out


def moe(cfg: LMConfig, tokens: int, spec: ActivationSpec,
        routed_rows: int | None = None) -> list[Saved]:
    """model/moe.py after the FFN norm, with the spec's dispatcher. `routed_rows`: the
    (token, k) rows this rank's experts receive (default T x K)."""
    T, K, D, E, c = tokens, cfg.top_k, cfg.hidden, cfg.num_experts, spec.compute_bytes
    TK = T * K
    R = TK if routed_rows is None or spec.dispatcher == "local" else routed_rows
    out = []
    if c != FP32:  # the router computes in fp32: x.float() and weight.float() are copies
        out += [Saved("router.input_fp32", T * D, FP32), Saved("router.weight_fp32", E * D, FP32)]
    out += [Saved("router.scores", T * E, FP32), Saved("router.topk", TK, INT64),
            Saved("router.chosen", TK, FP32), Saved("router.sum", T, FP32),
            # x[order // K]: the token of every expert-sorted pair
            Saved("dispatch.source_token", TK, INT64)]
    if spec.dispatcher == "all_to_all":  # received rows -> (local expert, source) order
        out.append(Saved("dispatch.regroup", R, INT64))
    # offsets: one int32 per local expert (E / ep with expert parallelism; E bounds it)
    out += [Saved("experts.offsets", E, INT32), Saved("experts.input", R * D, c),
            *_prefixed("experts", swiglu(R, cfg.expert_hidden, spec)),
            # local: the combine's weighting saves it; all-to-all: the ungroup's index_copy
            Saved("experts.out", R * D, c)]
    if spec.dispatcher == "all_to_all":  # the rows back in pair order, which the weighting saves
        out.append(Saved("combine.rows", TK * D, c))
    # weights[order] per row (in the rows' dtype), the token of each row, and weight * row:
    # index_add's source, which autograd keeps
    out += [Saved("combine.order", TK, INT64), Saved("combine.weights", TK, c),
            Saved("combine.token", TK, INT64), Saved("combine.weighted", TK * D, c)]
    if cfg.num_shared_experts:
        out += _prefixed("shared", swiglu(T, cfg.expert_hidden * cfg.num_shared_experts, spec))
    return out


def decoder_layer(cfg: LMConfig, index: int, batch: int, seq_len: int, spec: ActivationSpec,
                  routed_rows: int | None = None) -> list[Saved]:
    """One decoder layer (dense FFN for the first `first_k_dense`, MoE after), one microbatch."""
    T, D, c = batch * seq_len, cfg.hidden, spec.compute_bytes
    out = [Saved("input", T * D, c), *_prefixed("attn_norm", rms_norm(T, D, spec)),
           *_prefixed("attn", mla(cfg, batch, seq_len, spec)),
           Saved("residual", T * D, c), *_prefixed("ffn_norm", rms_norm(T, D, spec))]
    if index < cfg.first_k_dense:
        out += _prefixed("ffn", swiglu(T, cfg.dense_hidden, spec))
    else:
        out += _prefixed("moe", moe(cfg, T, spec, routed_rows))
    return out


def lm_chunk(cfg: LMConfig, chunk: ChunkSpec, batch: int, seq_len: int, spec: ActivationSpec,
             media_tokens: int = 0, routed_rows: int | None = None) -> list[Saved]:
    """A pipeline chunk (model/lm.py) and, with the head, the fused loss (model/loss.py:
    the chunk's forward given labels). `media_tokens`: placeholder positions the embedding
    chunk overwrites."""
    T, c = batch * seq_len, spec.compute_bytes
    out = []
    if chunk.embed:
        out.append(Saved("embed.tokens", T, INT64))
        if media_tokens:
            out.append(Saved("embed.media_index", media_tokens, INT64))
    if len(chunk.layers):  # the rotary tables, once per chunk: every layer's q and k use them
        out += [Saved("rope.cos", T * cfg.qk_rope_head_dim, c),
                Saved("rope.sin", T * cfg.qk_rope_head_dim, c)]
    for index in chunk.layers:
        out += _prefixed(f"layers.{index}",
                         decoder_layer(cfg, index, batch, seq_len, spec, routed_rows))
    if chunk.head:  # the norm's output feeds the fused loss, which keeps only its gradients
        out += [Saved("head.input", T * cfg.hidden, c),
                *[e for e in _prefixed("head.norm", rms_norm(T, cfg.hidden, spec))
                  if e.name != "head.norm.out"],
                Saved("loss.grad_hidden", T * cfg.hidden, c),
                Saved("loss.grad_weight", cfg.vocab_size * cfg.hidden, FP32)]
    return out


def vision_encoder(cfg: ModelConfig, grids: Sequence[Grid], spec: ActivationSpec
                   ) -> list[Saved]:
    """MoonViT-3D and the projector (model/vision.py, model/projector.py) over these items,
    run with grad (colocated stage 0, or DEP's recomputation)."""
    if not grids:
        return []
    v, c = cfg.vision, spec.compute_bytes
    N = sum(t * h * w for t, h, w in grids)
    merged = sum((h // 2) * (w // 2) for _, h, w in grids)
    D, H, G = v.hidden, v.heads, merged * v.merge_kernel ** 2  # G: merged groups x 4 patches
    out = [Saved("patches", N * v.patch_dim, c), Saved("pos_emb.index", N, INT64),
           Saved("pos_emb.is_chunk", N, BOOL)]
    for block in range(v.layers):
        entries = [Saved("input", N * D, c), Saved("attn_norm.mean", N, FP32),
                   Saved("attn_norm.rstd", N, FP32), Saved("attn_norm.out", N * D, c)]
        # 2D RoPE: cos and sin, computed once for q and once for k
        entries += [Saved(f"rope.{n}", N * v.head_dim // 2, c)
                    for n in ("cos_q", "sin_q", "cos_k", "sin_k")]
        if spec.attention == "dense":  # per item length: gather, batched SDPA, scatter back
            entries += [Saved("attn.rows", N, INT64), Saved("attn.q", N * D, c),
                        Saved("attn.k", N * D, c), Saved("attn.v", N * D, c),
                        Saved("attn.out", N * D, c), Saved("attn.lse", H * N, FP32),
                        Saved("attn.scatter_index", N, INT64),
                        Saved("attn.scatter_source", N * D, c), Saved("out.input", N * D, c)]
        else:  # varlen_attn: rotated q, k; v views the qkv output; its output feeds `out`
            entries += [Saved("attn.q", N * D, c), Saved("attn.k", N * D, c),
                        Saved("qkv.out", N * 3 * D, c), Saved("out.input", N * D, c),
                        Saved("attn.lse", H * N, FP32)]
        entries += [Saved("residual", N * D, c),
                    Saved("mlp_norm.mean", N, FP32), Saved("mlp_norm.rstd", N, FP32),
                    Saved("mlp_norm.out", N * D, c), Saved("mlp.up.out", N * v.mlp_hidden, c),
                    Saved("mlp.act", N * v.mlp_hidden, c)]
        out += _prefixed(f"blocks.{block}", entries)
    max_frames = max(t for t, _, _ in grids)
    out += [Saved("final_norm.input", N * D, c), Saved("final_norm.mean", N, FP32),
            Saved("final_norm.rstd", N, FP32),
            # merge: the source patch of every (group slot, frame), then / frames per slot
            Saved("merge.table", G * max_frames, INT64), Saved("merge.frames", G, c),
            Saved("projector.norm.input", G * D, c), Saved("projector.norm.mean", G, FP32),
            Saved("projector.norm.rstd", G, FP32), Saved("projector.norm.out", G * D, c),
            Saved("projector.fc1.out", G * D, c), Saved("projector.act", G * D, c)]
    return _prefixed("vision", out)
