"""MoonViT-3D: the native-resolution vision encoder with NaViT packing and the 2x2 merger.

All media items of a call (images, t = 1, and video chunks of up to `max_frames` frames)
are packed into ONE token sequence; attention is confined to each item, so the packed
result equals encoding every item alone, without padding anything:

    patches_NP:  | img 0: h0*w0 | chunk 1: t1*h1*w1 (frames jointly) | img 2 ... |
    cu_seqlens:  0             n0                                 n0+n1  ...
    attention:   [ block 0  ]
                               [        block 1                   ]
                                                                    [ block 2 ]

Where a patch is lives in three places, each with its own mechanism:

    (row, col) absolute  -> learnable 2D table, bicubic-resized to the item's grid
    (row, col) relative  -> 2D RoPE on q, k (half the pairs by row, half by column)
    frame index          -> fixed sinusoidal time embedding, only for chunks with t > 1

The frames of a chunk share their spatial positions, so without the time embedding
attention could not tell frame 0 from frame 3. After the final LayerNorm the patch
merger mean-pools each item over its frames (4x temporal compression) and groups 2x2
neighbours into one LM token (see `merge_patches`).

The forward is a pure function of parameters and inputs (no caches that change with
calls): DEP runs it under `no_grad`, later recomputes it with grad, and relies on both
giving bitwise the same embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import segment_attention
from model.config import VisionConfig
from model.norm import LayerNorm
from model.saved_tensors import STORE_ALL
from model.te_kernels import norm_then_linear

Grid = tuple[int, int, int]

INIT_STD = 0.02


def validate_grids(grid_thw: list[Grid], num_patch_rows: int, max_frames: int) -> None:
    """Refuse grids the encoder cannot pack or merge, naming the item and what to change."""
    for index, grid in enumerate(grid_thw):  # host metadata, checked once per call
        if len(grid) != 3:
            raise ValueError(f"grid_thw[{index}]={grid!r} must be a (t, h, w) triple")
    grids = torch.tensor(grid_thw, dtype=torch.int64, device="cpu").reshape(-1, 3)
    t, h, w = grids.unbind(1)
    bad_t = ((t < 1) | (t > max_frames)).nonzero()
    if len(bad_t):
        index = int(bad_t[0])
        raise ValueError(
            f"grid_thw[{index}]={tuple(grid_thw[index])}: t={int(t[index])} frames is outside "
            f"1..{max_frames} (cfg.max_frames); split longer videos into chunks of at most "
            f"{max_frames} frames")
    bad_hw = ((h <= 0) | (w <= 0) | (h % 2 != 0) | (w % 2 != 0)).nonzero()
    if len(bad_hw):
        index = int(bad_hw[0])
        raise ValueError(
            f"grid_thw[{index}]={tuple(grid_thw[index])}: h={int(h[index])} and w={int(w[index])} "
            "patch rows/columns must be even and positive for the 2x2 patch merger; resize or "
            "pad the image")
    total = int((t * h * w).sum())
    if total != num_patch_rows:
        raise ValueError(
            f"patches_NP has {num_patch_rows} rows but grid_thw {list(grid_thw)} needs "
            f"sum(t*h*w) = {total}; pass one grid per item, in the order of the patches")


@dataclass(frozen=True)
class PatchCoordinates:
    """Where every packed patch sits, computed once per forward from the grids (vectorised)."""

    item_N: Tensor
    frame_N: Tensor
    row_N: Tensor
    col_N: Tensor
    grids_I3: Tensor  # (t, h, w) per item

    @classmethod
    def of(cls, grids: list[Grid], device: torch.device) -> "PatchCoordinates":
        grids_I3 = torch.tensor(grids, dtype=torch.int64, device=device).reshape(-1, 3)
        t, h, w = grids_I3.unbind(1)
        lengths = t * h * w
        item_N = torch.repeat_interleave(torch.arange(len(grids), device=device), lengths,
                                         output_size=sum(a * b * c for a, b, c in grids))
        starts = lengths.cumsum(0) - lengths
        local = torch.arange(item_N.shape[0], device=device) - starts[item_N]
        area = (h * w)[item_N]
        within = local % area
        return cls(item_N, local // area, within // w[item_N], within % w[item_N], grids_I3)


def rope_2d_angles(rows_N: Tensor, cols_N: Tensor, head_dim: int, theta: float) -> Tensor:
    """Rotation angle of every rotary pair of a head: [N, head_dim // 2].

    Pairs alternate row, column, row, column, ... and pair 2j and 2j+1 share the frequency
    theta^(-4j / head_dim), so both axes get the full frequency range. (Kimi-VL's and K2.5's
    Rope2DPosEmb interleave column first; that is the same network up to a fixed permutation
    of q and k dims, which the Hugging Face converter applies to the weights:
    model/hf_vision_names.py.) Since every angle is position * frequency, q.k after rotation
    depends only on the (row, col) offset of the two patches.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv_freq = theta ** (-torch.arange(quarter, dtype=torch.float32, device=rows_N.device)
                         * 4.0 / head_dim)
    row_angles = rows_N.to(torch.float32)[:, None] * inv_freq[None, :]
    col_angles = cols_N.to(torch.float32)[:, None] * inv_freq[None, :]
    return torch.stack([row_angles, col_angles], dim=-1).reshape(rows_N.shape[0], 2 * quarter)


def apply_rope_2d(x_NHD: Tensor, angles_NR: Tensor) -> Tensor:
    """Rotate adjacent element pairs (x[2i], x[2i+1]) of every head by angles_NR[:, i]."""
    n, heads, head_dim = x_NHD.shape
    pairs = x_NHD.reshape(n, heads, head_dim // 2, 2)
    cos = angles_NR.cos()[:, None, :].to(x_NHD.dtype)
    sin = angles_NR.sin()[:, None, :].to(x_NHD.dtype)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.reshape(n, heads, head_dim)


def sinusoidal_time_embedding(num_frames: int, dim: int) -> Tensor:
    """Fixed [num_frames, dim] embedding of the frame index: sin on the first half, cos on
    the second, frequencies 10000^(-i / (dim/2)) as in the Transformer."""
    if dim % 2:
        raise ValueError(f"sinusoidal time embedding needs an even dim, got {dim}")
    half = dim // 2
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64, device="cpu") / half)
    angles = torch.arange(num_frames, dtype=torch.float64, device="cpu")[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(torch.float32)


def merge_patches(features_ND: Tensor, grid_thw: list[Grid],
                  coords: PatchCoordinates | None = None) -> Tensor:
    """Per item: [t, h, w, D] -> mean over t -> 2x2 groups [(h/2)*(w/2), 4, D].

    Groups are ordered row-major over (row pair, column pair); inside a group the four
    patches are (dy, dx) row-major:

        patch grid (h=4, w=4)        merged tokens          group k = [a, b, c, d]
        a b | . .                    0 1                    a=(0,0) b=(0,1)
        c d | . .                    2 3                    c=(1,0) d=(1,1)
        ----+----

    Vectorised and deterministic on every device: a table of the source patch of every
    (group slot, frame), a gather, a sum over frames in frame order, a division by t.
    """
    dim = features_ND.shape[-1]
    if not grid_thw:
        return features_ND.reshape(0, 4, dim)
    coords = coords or PatchCoordinates.of(grid_thw, features_ND.device)
    t, h, w = coords.grids_I3.unbind(1)
    groups = (h // 2) * (w // 2)
    first_group = groups.cumsum(0) - groups
    item, row, col = coords.item_N, coords.row_N, coords.col_N
    group_N = first_group[item] + (row // 2) * (w[item] // 2) + col // 2
    slot_N = group_N * 4 + (row % 2) * 2 + col % 2
    max_frames = int(t.max())
    num_slots = int(groups.sum()) * 4
    pad_row = features_ND.shape[0]  # a zero row for the frames an item does not have
    table = torch.full((num_slots, max_frames), pad_row, dtype=torch.int64,
                       device=features_ND.device)
    table[slot_N, coords.frame_N] = torch.arange(pad_row, device=features_ND.device)
    padded = torch.cat([features_ND, features_ND.new_zeros(1, dim)])
    frames_of_slot = t.repeat_interleave(groups * 4, output_size=num_slots)
    pooled = padded[table].sum(1) / frames_of_slot.unsqueeze(1).to(features_ND.dtype)
    return pooled.view(-1, 4, dim)


class Learnable2DPosEmb(nn.Module):
    """Learnable [H, W, D] table; items with another grid get it bicubic-resized, so one
    table serves every native resolution (the table keeps SigLIP's fixed-size embedding)."""

    def __init__(self, height: int, width: int, dim: int):
        super().__init__()
        self.weight_HWD = nn.Parameter(torch.empty(height, width, dim))

    def forward(self, h: int, w: int) -> Tensor:
        """[h, w, D] embedding for an h x w patch grid."""
        if (h, w) == tuple(self.weight_HWD.shape[:2]):
            return self.weight_HWD
        table_1DHW = self.weight_HWD.permute(2, 0, 1).unsqueeze(0)
        resized_1Dhw = F.interpolate(table_1DHW, size=(h, w), mode="bicubic", align_corners=False)
        return resized_1Dhw.squeeze(0).permute(1, 2, 0)


class VisionAttention(nn.Module):
    """Multi-head self-attention with 2D RoPE, confined to packed segments. Takes the qkv
    projection's output, so the block can fuse the norm into that projection."""

    def __init__(self, cfg: VisionConfig, te: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.te = cfg.heads, cfg.head_dim, te
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=True)
        self.out = nn.Linear(cfg.hidden, cfg.hidden, bias=True)

    def forward(self, qkv_N3D: Tensor, rope_angles_NR: Tensor, lengths: list[int]) -> Tensor:
        n = qkv_N3D.shape[0]
        q_NHD, k_NHD, v_NHD = qkv_N3D.reshape(n, 3, self.heads, self.head_dim).unbind(1)
        q_NHD = apply_rope_2d(q_NHD, rope_angles_NR)
        k_NHD = apply_rope_2d(k_NHD, rope_angles_NR)
        attended_NHD = segment_attention(q_NHD, k_NHD, v_NHD, lengths, self.te)
        return self.out(attended_NHD.reshape(n, self.heads * self.head_dim))


class VisionMLP(nn.Module):
    """The block MLP's weights (up, GELU, down); `VisionBlock` runs them, so that the norm
    can fuse into `up`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden, cfg.mlp_hidden, bias=True)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.hidden, bias=True)


class VisionBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); each LN feeds one
    projection (qkv, up), fused with it under transformer-engine."""

    def __init__(self, cfg: VisionConfig, te: bool = False):
        super().__init__()
        self.te = te
        self.attn_norm = LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg, te)
        self.mlp_norm = LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg)
        self.memory = STORE_ALL  # the block's binding of the memory policy

    def forward(self, x_ND: Tensor, rope_angles_NR: Tensor, lengths: list[int]) -> Tensor:
        memory = self.memory
        with memory.layer():
            qkv = memory.region("attn_norm", lambda x: norm_then_linear(
                self.attn_norm, self.attn.qkv, x, self.te), x_ND)
            x_ND = x_ND + memory.region("attention", self.attn, qkv, rope_angles_NR, lengths)
            return x_ND + memory.region("mlp", self._mlp, x_ND)

    def _mlp(self, x_ND: Tensor) -> Tensor:
        hidden = norm_then_linear(self.mlp_norm, self.mlp.up, x_ND, self.te)
        return self.mlp.down(F.gelu(hidden, approximate="tanh"))


class MoonViT3D(nn.Module):
    """Packed patches of images and video chunks -> 2x2-merged, time-pooled features."""

    def __init__(self, cfg: VisionConfig, te: bool = False):
        super().__init__()
        if cfg.hidden % cfg.heads or cfg.head_dim % 4:
            raise ValueError(
                f"vision hidden={cfg.hidden} / heads={cfg.heads} must give a head dim divisible "
                "by 4 (2D RoPE: half the pairs for rows, half for columns)")
        if cfg.merge_kernel != 2:
            raise ValueError(f"vision merge_kernel={cfg.merge_kernel}: only the 2x2 merger exists")
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.hidden, bias=True)
        self.pos_emb = Learnable2DPosEmb(cfg.pos_emb_height, cfg.pos_emb_width, cfg.hidden)
        # Fixed, so not a parameter; not persistent, so checkpoints hold only learned state.
        self.register_buffer("time_emb_FD", sinusoidal_time_embedding(cfg.max_frames, cfg.hidden),
                             persistent=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg, te) for _ in range(cfg.layers))
        self.final_norm = LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.reset_parameters()

    def reset_buffers(self) -> None:
        self.time_emb_FD.copy_(sinusoidal_time_embedding(self.cfg.max_frames, self.cfg.hidden))

    def reset_parameters(self) -> None:
        """SigLIP-style init; the caller seeds torch beforehand for reproducibility."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_emb.weight_HWD, std=INIT_STD)

    def forward(self, patches_NP: Tensor, grid_thw: list[Grid]) -> Tensor:
        """patches_NP: [sum_i t_i*h_i*w_i, cfg.patch_dim] — items concatenated in order, each item's
        patches ordered (t, h, w) row-major, each row the flattened (channel, y, x) 14x14 pixels.
        Returns merged_MKD: [sum_i (h_i//2)*(w_i//2), 4, cfg.hidden] in item order (the 2x2 groups,
        after mean-pooling over the item's t frames)."""
        if patches_NP.dim() != 2 or patches_NP.shape[1] != self.cfg.patch_dim:
            raise ValueError(
                f"patches_NP has shape {tuple(patches_NP.shape)}, expected [N, {self.cfg.patch_dim}] "
                f"(in_channels*patch_size^2 = {self.cfg.in_channels}*{self.cfg.patch_size}^2)")
        grids = [tuple(int(v) for v in g) for g in grid_thw]
        validate_grids(grids, patches_NP.shape[0], self.cfg.max_frames)

        coords = PatchCoordinates.of(grids, patches_NP.device)
        dtype = self.patch_embed.weight.dtype  # the compute dtype (pixels arrive in fp32)
        x_ND = self.patch_embed(patches_NP.to(dtype)) + self._position_embeddings(grids, coords)
        rope_angles_NR = rope_2d_angles(coords.row_N, coords.col_N, self.cfg.head_dim,
                                        self.cfg.rope_theta)
        lengths = [t * h * w for t, h, w in grids]
        for block in self.blocks:
            x_ND = block(x_ND, rope_angles_NR, lengths)
        return merge_patches(self.final_norm(x_ND), grids, coords)

    def _position_embeddings(self, grids: list[Grid], coords: PatchCoordinates) -> Tensor:
        """[N, D]: the resized 2D table on every frame, plus the frame's time embedding for
        chunks (t > 1); single images get no time term, so they match image-only training.
        One bicubic resize per distinct (h, w) of the call, then one gather for all patches."""
        sizes = sorted({(h, w) for _, h, w in grids})
        tables = torch.cat([self.pos_emb(h, w).reshape(h * w, self.cfg.hidden)
                            for h, w in sizes]) if sizes else self.pos_emb.weight_HWD[:0, 0]
        offset = {size: 0 for size in sizes}
        running = 0
        for h, w in sizes:
            offset[(h, w)] = running
            running += h * w
        item_offset = torch.tensor([offset[(h, w)] for _, h, w in grids], dtype=torch.int64,
                                   device=coords.item_N.device)
        width = coords.grids_I3[:, 2]
        index_N = item_offset[coords.item_N] + coords.row_N * width[coords.item_N] + coords.col_N
        pos_ND = tables[index_N]
        is_chunk_N = (coords.grids_I3[:, 0] > 1)[coords.item_N].unsqueeze(1)
        return torch.where(is_chunk_N, pos_ND + self.time_emb_FD[coords.frame_N].to(pos_ND.dtype), pos_ND)
