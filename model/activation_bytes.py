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

Memory policies (model/memory_policy.py): every entry lists the regions that save it
(`Save`: region, how many times, which view) and, for a recomputable region's inputs,
the one save checkpoint makes when the region is recomputed. `apply_policy` then does
what model/saved_tensors.py does, save by save, and gives device and host bytes per
layer (tests/model/test_activation_policy_bytes.py holds it to that module's accounting):

    recomputable region  saves when stored (x2: two ops save it)    keeps when recomputed
    attn_norm            input x2, rstd x2, x*rstd, out x2           input
    q_up                 q_down.out x2, q_norm: rstd x2, x*rstd, out  q_down.out
    kv_up                kv_down.out's latent view x2, kv_norm's      that view
    ffn_norm             residual x2, rstd x2, x*rstd (MoE: out,      residual (the scores
                         read by the router, and its scores)          stay: router saves them)
    ffn (dense)          ffn_norm.out x2, gate, up, silu, product     ffn_norm.out
    experts              offsets x3, input x2, gate, up, silu, prod.  input, offsets
    shared               ffn_norm.out x2, gate, up, silu, product     ffn_norm.out
    vision attn_norm     input, mean, rstd, out                       input
    vision mlp           residual, mean, rstd, out, up, act           residual
    head loss            input x2, rstd x2, x*rstd, grad_hidden,      input, labels
                         grad_weight

A storage stored as is counts once, however many ops save it; an FP8 or offloaded tensor
is copied once per region and view (model/saved_tensors.py shares the copy between the
region's saves of the same bytes), so it counts once per region that saves it.

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

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Sequence

from model.config import LMConfig, ModelConfig
from model.lm import ChunkSpec
from model.memory_policy import MemoryPolicy

FP32, INT64, INT32, BOOL = 4, 8, 4, 1
ATTENTION_KERNELS = ("dense", "flash")

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class Save:
    """One op saving (a view of) an entry inside a memory-policy region: `count` times,
    `numel` elements each (default: the whole entry). `checkpoint`: the save that
    torch.utils.checkpoint makes of the region's input when the region is recomputed
    (and only then). `layer`, `layer_type`: filled in by the layer that holds the region."""

    region: str
    count: int = 1
    numel: int | None = None
    checkpoint: bool = False
    layer: str = ""
    layer_type: str = ""


@dataclass(frozen=True)
class Saved:
    """One tensor kept for backward: `numel` elements of `itemsize` bytes. `saves`: the
    regions that keep it, in forward order (none: saved outside any region, by code no
    policy reaches: the embedding, the vision encoder's stem and merger); `cols`: its last
    dimension (FP8 scale per row); `floating`: FP8 applies to floating tensors only."""

    name: str
    numel: int
    itemsize: int
    saves: tuple[Save, ...] = ()
    cols: int = 0
    floating: bool = True

    @property
    def bytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def stored_by_default(self) -> bool:
        """False for a region's input that only checkpoint saves (the labels)."""
        return not self.saves or any(not s.checkpoint for s in self.saves)

    @property
    def rows(self) -> int:
        return self.numel // self.cols if self.cols else 1


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
    """Bytes saved when everything is stored (what no policy, or `none`, keeps)."""
    return sum(e.bytes for e in entries if e.stored_by_default)


OUTSIDE = ""  # the layer name of bytes saved outside any region (no policy reaches them)


@dataclass
class PolicyBytes:
    """Where a policy puts the saved tensors of some entries: bytes on the device and in
    host memory, in total and per layer ("layers.3", "head", "vision.blocks.0"; OUTSIDE for
    entries no region saves), as model/saved_tensors.py accounts them."""

    device: int = 0
    host: int = 0
    layers: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: {"device": 0, "host": 0}))

    def add(self, layer: str, where: str, nbytes: int) -> None:
        setattr(self, where, getattr(self, where) + nbytes)
        self.layers[layer][where] += nbytes


def fp8_bytes(numel: int, rows: int, scaling: str) -> int:
    """model/fp8.py: a 1-byte payload and an fp32 scale per tensor or per row."""
    return numel + FP32 * (rows if scaling == "row" else 1)


def apply_policy(entries: Sequence[Saved], policy: MemoryPolicy) -> PolicyBytes:
    """What `policy` keeps of `entries`, save by save, as model/saved_tensors.py does:

        region recomputed   its own saves are dropped; its inputs are saved once
                            (checkpoint's `Save(checkpoint=True)`), with the region's
                            FP8 / offload treatment
        FP8 (floating)      one 1-byte copy + scale per region and view saved: the
                            region's later saves of the same view share it
        offloaded           one host copy per region and view saved (FP8 first if both);
                            saved again in another region, copied again
        stored as is        the storage counts once, in the layer that saves it first
        no region           stored as is, on the device (OUTSIDE)
    """
    out = PolicyBytes()
    treatments: dict[tuple[str, str, str], tuple[bool, bool, bool]] = {}
    for e in entries:
        if not e.saves:
            out.add(OUTSIDE, "device", e.bytes)
            continue
        stored, copied = False, set()
        for s in e.saves:
            key = (s.layer, s.layer_type, s.region)
            if key not in treatments:
                index = int(s.layer[7:]) if s.layer.startswith("layers.") else None
                treatments[key] = policy.treatment(s.layer_type, s.region, index)
            recompute, fp8, offload = treatments[key]
            if s.checkpoint != recompute:
                continue
            numel = e.numel if s.numel is None else s.numel
            if (fp8 and e.floating) or offload:
                if (key, numel) in copied:  # the region's copy of this view exists
                    continue
                copied.add((key, numel))
            if fp8 and e.floating:
                rows = max(1, round(e.rows * numel / e.numel))
                out.add(s.layer, "host" if offload else "device",
                        fp8_bytes(numel, rows, policy.fp8_scaling))
            elif offload:
                out.add(s.layer, "host", numel * e.itemsize)
            elif not stored:
                stored = True
                out.add(s.layer, "device", e.bytes)
    return out


def _prefixed(prefix: str, entries: list[Saved]) -> list[Saved]:
    return [replace(e, name=f"{prefix}.{e.name}") for e in entries]


def _in(region: str, count: int = 1, numel: int | None = None) -> tuple[Save, ...]:
    """Saved `count` times by the region; recomputing it drops those saves."""
    return (Save(region, count, numel),)


def _input_of(region: str, numel: int | None = None) -> Save:
    """The region's input, which checkpoint keeps once when the region is recomputed."""
    return Save(region, 1, numel, checkpoint=True)


def _index(name: str, numel: int, itemsize: int = INT64, saves=()) -> Saved:
    return Saved(name, numel, itemsize, saves, floating=False)


def _bind(layer: str, layer_type: str, entries: list[Saved]) -> list[Saved]:
    """Bind the regions' saves to this layer."""
    return [replace(e, saves=tuple(replace(s, layer=layer, layer_type=layer_type)
                                   for s in e.saves)) for e in entries]


def _layer(prefix: str, layer_type: str, entries: list[Saved]) -> list[Saved]:
    return _bind(prefix, layer_type, _prefixed(prefix, entries))


def rms_norm(rows: int, dim: int, spec: ActivationSpec, region: str) -> list[Saved]:
    """nn.RMSNorm's own products (its input belongs to whoever made it, saved twice by the
    norm): the fp32 rstd (twice), x * rstd (for the scale's gradient) and the output (the
    next matmul's input, saved by its reader: the caller sets `out`'s saves)."""
    c = spec.compute_bytes
    return [Saved("rstd", rows, FP32, _in(region, 2), cols=1),
            Saved("normalized", rows * dim, c, _in(region), cols=dim),
            Saved("out", rows * dim, c, _in(region), cols=dim)]


def swiglu(rows: int, inner: int, spec: ActivationSpec, region: str) -> list[Saved]:
    """down(silu(gate(x)) * up(x)): the input belongs to the caller."""
    c = spec.compute_bytes
    return [Saved(n, rows * inner, c, _in(region), cols=inner)
            for n in ("gate", "up", "silu", "product")]


def mla(cfg: LMConfig, batch: int, seq_len: int, spec: ActivationSpec) -> list[Saved]:
    """model/mla.py after the attention norm, up to o_proj's input (the rotary tables are
    the chunk's: `lm_chunk`). Regions: q_up (q_norm + q_up), kv_up (kv_norm + kv_up),
    attention, o_proj; q_down's and kv_down's outputs are read (and saved) by the up
    regions: recomputing those keeps them once as their input."""
    T, H, c = batch * seq_len, cfg.heads, spec.compute_bytes
    Q, V, R = cfg.qk_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    out = [Saved("q_down.out", T * cfg.q_lora_rank, c,
                 (*_in("q_up", 2), _input_of("q_up")), cols=cfg.q_lora_rank),
           *_prefixed("q_norm", rms_norm(T, cfg.q_lora_rank, spec, "q_up")),
           # kv_norm reads the latent part (a view); the rotary part goes to attention
           Saved("kv_down.out", T * (R + cfg.qk_rope_head_dim), c,
                 (Save("kv_up", 2, T * R), Save("kv_up", 1, T * R, checkpoint=True)),
                 cols=R + cfg.qk_rope_head_dim),
           *_prefixed("kv_norm", rms_norm(T, R, spec, "kv_up"))]
    kv_up = Saved("kv_up.out", T * H * (cfg.qk_nope_head_dim + V), c,
                  _in("attention", 1, T * H * V), cols=V)  # [k_nope | v]: v is read
    o_proj = Saved("o_proj.input", T * H * V, c, _in("o_proj"), cols=H * V)
    if spec.attention == "dense":  # SDPA's math path: scaled q, k^T, probabilities, v
        out += [Saved("q", T * H * Q, c, _in("attention"), cols=Q),
                Saved("k", T * H * Q, c, _in("attention"), cols=seq_len),
                # v is a strided view of kv_up's output; with B > 1 the math path's bmm
                # copies it to [B*H, S, dv]
                Saved("v", T * H * V, c, _in("attention"), cols=V) if batch > 1 else kv_up,
                Saved("probs", batch * H * seq_len * seq_len, c, _in("attention", 2),
                      cols=seq_len),
                o_proj]
    else:  # varlen_attn's inputs (the concatenated q, k), output and log-sum-exp
        out += [Saved("q", T * H * Q, c, _in("attention"), cols=Q),
                Saved("k", T * H * Q, c, _in("attention"), cols=Q)]
        lse = Saved("lse", H * T, FP32, _in("attention"), cols=T)
        if V != Q:  # v zero-padded to Q, the output sliced back by a copy: o_proj's input
            out += [Saved("v_padded", T * H * Q, c, _in("attention"), cols=Q),
                    Saved("out_padded", T * H * Q, c, _in("attention"), cols=Q), lse, o_proj]
        else:  # v views kv_up's output; o_proj reads the kernel's output
            out += [replace(kv_up, saves=_in("attention")), o_proj, lse]
    return out


def moe(cfg: LMConfig, tokens: int, spec: ActivationSpec,
        routed_rows: int | None = None) -> list[Saved]:
    """model/moe.py after the FFN norm, with the spec's dispatcher. `routed_rows`: the
    (token, k) rows this rank's experts receive (default T x K). Regions: router, dispatch,
    experts, combine, shared (the router's scores are computed in ffn_norm's region)."""
    T, K, D, E, c = tokens, cfg.top_k, cfg.hidden, cfg.num_experts, spec.compute_bytes
    I = cfg.expert_hidden
    TK = T * K
    R = TK if routed_rows is None or spec.dispatcher == "local" else routed_rows
    out = []
    if c != FP32:  # the router computes in fp32: x.float() and weight.float() are copies
        out += [Saved("router.input_fp32", T * D, FP32, _in("ffn_norm"), cols=D),
                Saved("router.weight_fp32", E * D, FP32, _in("ffn_norm"), cols=D)]
    out += [Saved("router.scores", T * E, FP32, (*_in("ffn_norm"), *_in("router")), cols=E),
            _index("router.topk", TK, saves=_in("router")),
            Saved("router.chosen", TK, FP32, _in("router"), cols=K),
            Saved("router.sum", T, FP32, _in("router"), cols=1),
            # x[order // K]: the token of every expert-sorted pair
            _index("dispatch.source_token", TK, saves=_in("dispatch"))]
    if spec.dispatcher == "all_to_all":  # received rows -> (local expert, source) order
        out.append(_index("dispatch.regroup", R, saves=_in("dispatch")))
    # offsets: one int32 per local expert (E / ep with expert parallelism; E bounds it)
    out += [_index("experts.offsets", E, INT32,
                   (*_in("experts", 3), _input_of("experts"))),
            Saved("experts.input", R * D, c, (*_in("experts", 2), _input_of("experts")),
                  cols=D),
            *_prefixed("experts", swiglu(R, I, spec, "experts")),
            # local: the combine's weighting saves it; all-to-all: the ungroup's index_copy
            Saved("experts.out", R * D, c, _in("combine"), cols=D)]
    if spec.dispatcher == "all_to_all":  # the rows back in pair order, which the weighting saves
        out.append(Saved("combine.rows", TK * D, c, _in("combine"), cols=D))
    # weights[order] per row (in the rows' dtype), the token of each row, and weight * row:
    # index_add's source, which autograd keeps
    out += [_index("combine.order", TK, saves=_in("combine")),
            Saved("combine.weights", TK, c, _in("combine"), cols=1),
            _index("combine.token", TK, saves=_in("combine")),
            Saved("combine.weighted", TK * D, c, _in("combine"), cols=D)]
    if cfg.num_shared_experts:
        out += _prefixed("shared", swiglu(T, I * cfg.num_shared_experts, spec, "shared"))
    return out


def decoder_layer(cfg: LMConfig, index: int, batch: int, seq_len: int, spec: ActivationSpec,
                  routed_rows: int | None = None) -> list[Saved]:
    """One decoder layer (dense FFN for the first `first_k_dense`, MoE after), one
    microbatch; names and regions bound to `layers.<index>` (model/lm.py: attn_norm runs
    the norm with q_down and kv_down, ffn_norm the norm with the router's scores)."""
    T, D, c = batch * seq_len, cfg.hidden, spec.compute_bytes
    dense = index < cfg.first_k_dense
    norm_out = [Saved("attn_norm.out", T * D, c, _in("attn_norm", 2), cols=D)]
    out = [Saved("input", T * D, c, (*_in("attn_norm", 2), _input_of("attn_norm")), cols=D),
           *[e for e in _prefixed("attn_norm", rms_norm(T, D, spec, "attn_norm"))
             if e.name != "attn_norm.out"], *norm_out,
           *_prefixed("attn", mla(cfg, batch, seq_len, spec)),
           Saved("residual", T * D, c, (*_in("ffn_norm", 2), _input_of("ffn_norm")), cols=D),
           *[e for e in _prefixed("ffn_norm", rms_norm(T, D, spec, "ffn_norm"))
             if e.name != "ffn_norm.out"]]
    if dense:  # the norm's output is the FFN's input (gate and up read it)
        out += [Saved("ffn_norm.out", T * D, c, (*_in("ffn", 2), _input_of("ffn")), cols=D),
                *_prefixed("ffn", swiglu(T, cfg.dense_hidden, spec, "ffn"))]
    else:  # read by the router (in ffn_norm's region) and the shared expert
        shared = (*_in("shared", 2), _input_of("shared")) if cfg.num_shared_experts else ()
        out += [Saved("ffn_norm.out", T * D, c, (*_in("ffn_norm"), *shared), cols=D),
                *_prefixed("moe", moe(cfg, T, spec, routed_rows))]
    return _layer(f"layers.{index}", "dense" if dense else "moe", out)


def lm_chunk(cfg: LMConfig, chunk: ChunkSpec, batch: int, seq_len: int, spec: ActivationSpec,
             media_tokens: int = 0, routed_rows: int | None = None) -> list[Saved]:
    """A pipeline chunk (model/lm.py) and, with the head, the fused loss (model/loss.py:
    the chunk's forward given labels). `media_tokens`: placeholder positions the embedding
    chunk overwrites."""
    T, c, D = batch * seq_len, spec.compute_bytes, cfg.hidden
    out = []
    if chunk.embed:
        out.append(_index("embed.tokens", T))
        if media_tokens:
            out.append(_index("embed.media_index", media_tokens))
    if len(chunk.layers):  # the rotary tables, once per chunk: every layer's q and k use them
        rope = tuple(Save("attention", 2, layer=f"layers.{i}",
                          layer_type="dense" if i < cfg.first_k_dense else "moe")
                     for i in chunk.layers)
        out += [Saved(f"rope.{n}", T * cfg.qk_rope_head_dim, c, rope, cols=cfg.qk_rope_head_dim)
                for n in ("cos", "sin")]
    for index in chunk.layers:
        out += decoder_layer(cfg, index, batch, seq_len, spec, routed_rows)
    if chunk.head:  # region loss: the final norm and the fused loss, which keeps only its
        # gradients (and, recomputed, its input and the labels)
        out += _bind("head", "head", [
            Saved("head.input", T * D, c, (*_in("loss", 2), _input_of("loss")), cols=D),
            *[e for e in _prefixed("head.norm", rms_norm(T, D, spec, "loss"))
              if e.name != "head.norm.out"],
            _index("head.labels", T, saves=(_input_of("loss"),)),
            Saved("loss.grad_hidden", T * D, c, _in("loss"), cols=D),
            Saved("loss.grad_weight", cfg.vocab_size * D, FP32, _in("loss"), cols=D)])
    return out


def vision_encoder(cfg: ModelConfig, grids: Sequence[Grid], spec: ActivationSpec
                   ) -> list[Saved]:
    """MoonViT-3D and the projector (model/vision.py, model/projector.py) over these items,
    run with grad (colocated stage 0, or DEP's recomputation). Each block's regions:
    attn_norm (LayerNorm + qkv), attention, mlp (LayerNorm + up + GELU + down)."""
    if not grids:
        return []
    v, c = cfg.vision, spec.compute_bytes
    N = sum(t * h * w for t, h, w in grids)
    merged = sum((h // 2) * (w // 2) for _, h, w in grids)
    D, H, G = v.hidden, v.heads, merged * v.merge_kernel ** 2  # G: merged groups x 4 patches
    M, R = v.mlp_hidden, v.head_dim // 2
    out = [Saved("patches", N * v.patch_dim, c), _index("pos_emb.index", N),
           _index("pos_emb.is_chunk", N, BOOL)]

    def attention(name, numel, itemsize=c, count=1, cols=0):
        return Saved(f"attn.{name}", numel, itemsize, _in("attention", count), cols=cols)

    for block in range(v.layers):
        entries = [Saved("input", N * D, c, (*_in("attn_norm"), _input_of("attn_norm")),
                         cols=D),
                   Saved("attn_norm.mean", N, FP32, _in("attn_norm"), cols=1),
                   Saved("attn_norm.rstd", N, FP32, _in("attn_norm"), cols=1),
                   Saved("attn_norm.out", N * D, c, _in("attn_norm"), cols=D)]
        # 2D RoPE: cos and sin, computed once for q and once for k, each saved twice
        entries += [Saved(f"rope.{n}", N * R, c, _in("attention", 2), cols=R)
                    for n in ("cos_q", "sin_q", "cos_k", "sin_k")]
        if spec.attention == "dense":  # per item length: gather, batched SDPA, scatter back
            entries += [_index("attn.rows", N, saves=_in("attention", 3)),
                        attention("q", N * D, cols=v.head_dim),
                        attention("k", N * D, cols=v.head_dim),
                        attention("v", N * D, cols=v.head_dim),
                        attention("out", N * D, cols=v.head_dim),
                        attention("lse", H * N, FP32),
                        _index("attn.scatter_index", N, saves=_in("attention")),
                        attention("scatter_source", N * D, cols=v.head_dim),
                        attention("out.input", N * D, cols=D)]
        else:  # varlen_attn: rotated q, k; v views the qkv output; its output feeds `out`
            entries += [attention("q", N * D, cols=v.head_dim),
                        attention("k", N * D, cols=v.head_dim),
                        Saved("qkv.out", N * 3 * D, c, _in("attention", 1, N * D),
                              cols=3 * D),
                        attention("out.input", N * D, cols=D), attention("lse", H * N, FP32)]
        entries += [Saved("residual", N * D, c, (*_in("mlp"), _input_of("mlp")), cols=D),
                    Saved("mlp_norm.mean", N, FP32, _in("mlp"), cols=1),
                    Saved("mlp_norm.rstd", N, FP32, _in("mlp"), cols=1),
                    Saved("mlp_norm.out", N * D, c, _in("mlp"), cols=D),
                    Saved("mlp.up.out", N * M, c, _in("mlp"), cols=M),
                    Saved("mlp.act", N * M, c, _in("mlp"), cols=M)]
        out += _layer(f"blocks.{block}", "vision", entries)
    max_frames = max(t for t, _, _ in grids)
    out += [Saved("final_norm.input", N * D, c), Saved("final_norm.mean", N, FP32),
            Saved("final_norm.rstd", N, FP32),
            # merge: the source patch of every (group slot, frame), then / frames per slot
            _index("merge.table", G * max_frames), Saved("merge.frames", G, c),
            Saved("projector.norm.input", G * D, c), Saved("projector.norm.mean", G, FP32),
            Saved("projector.norm.rstd", G, FP32), Saved("projector.norm.out", G * D, c),
            Saved("projector.fc1.out", G * D, c), Saved("projector.act", G * D, c)]
    return _vision_prefixed(out)


def _vision_prefixed(entries: list[Saved]) -> list[Saved]:
    return [replace(e, name=f"vision.{e.name}",
                    saves=tuple(replace(s, layer=f"vision.{s.layer}") for s in e.saves))
            for e in entries]
