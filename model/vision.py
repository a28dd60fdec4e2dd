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


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import VisionConfig
from model.norm import LayerNorm

Grid = tuple[int, int, int]

INIT_STD = 0.02


def validate_grids(grid_thw: list[Grid], num_patch_rows: int, max_frames: int) -> None:
    """Refuse grids the encoder cannot pack or merge, naming the item and what to change."""
    total = 0
    for index, grid in enumerate(grid_thw):
        if len(grid) != 3:
            raise ValueError(f"grid_thw[{index}]={grid!r} must be a (t, h, w) triple")
        t, h, w = (int(v) for v in grid)
        if not 1 <= t <= max_frames:
            raise ValueError(
                f"grid_thw[{index}]={tuple(grid)}: t={t} frames is outside 1..{max_frames} "
                f"(cfg.max_frames); split longer videos into chunks of at most {max_frames} frames")
        if h <= 0 or w <= 0 or h % 2 or w % 2:
            raise ValueError(
                f"grid_thw[{index}]={tuple(grid)}: h={h} and w={w} patch rows/columns must be even "
                "and positive for the 2x2 patch merger; resize or pad the image")
        total += t * h * w
    if total != num_patch_rows:
        raise ValueError(
            f"patches_NP has {num_patch_rows} rows but grid_thw {list(grid_thw)} needs "
            f"sum(t*h*w) = {total}; pass one grid per item, in the order of the patches")


def segment_attention(q_NHD: Tensor, k_NHD: Tensor, v_NHD: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Attention of a packed sequence, confined to the segments [cu[i], cu[i+1]).

    Equivalent to one attention call with a block-diagonal mask, but exact and O(sum n_i^2)
    memory because each segment is its own dense call. Kept behind this one function so a
    GPU varlen (flash) kernel with the same (q, k, v, cu_seqlens) contract can replace it.
    """
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if not bounds or bounds[0] != 0 or bounds[-1] != q_NHD.shape[0] or any(
            b1 < b0 for b0, b1 in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens {bounds} must rise from 0 to the sequence length "
                         f"{q_NHD.shape[0]}")
    outputs = []
    for start, end in zip(bounds, bounds[1:]):
        if end == start:
            continue
        q_HSD, k_HSD, v_HSD = (x[start:end].transpose(0, 1) for x in (q_NHD, k_NHD, v_NHD))
        outputs.append(F.scaled_dot_product_attention(q_HSD, k_HSD, v_HSD).transpose(0, 1))
    if not outputs:
        return v_NHD[:0]
    return torch.cat(outputs, dim=0)


def rope_2d_angles(rows_N: Tensor, cols_N: Tensor, head_dim: int, theta: float) -> Tensor:
    """Rotation angle of every rotary pair of a head: [N, head_dim // 2].

    Pairs alternate row, column, row, column, ... and pair 2j and 2j+1 share the frequency
    theta^(-4j / head_dim), so both axes get the full frequency range (the interleaving of
    Kimi-VL's Rope2DPosEmb). Since every angle is position * frequency, q.k after rotation
    depends only on the (row, col) offset of the two patches.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv_freq = theta ** (-torch.arange(quarter, dtype=torch.float32) * 4.0 / head_dim)
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
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(num_frames, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(torch.float32)


def merge_patches(features_ND: Tensor, grid_thw: list[Grid]) -> Tensor:
    """Per item: [t, h, w, D] -> mean over t -> 2x2 groups [(h/2)*(w/2), 4, D].

    Groups are ordered row-major over (row pair, column pair); inside a group the four
    patches are (dy, dx) row-major:

        patch grid (h=4, w=4)        merged tokens          group k = [a, b, c, d]
        a b | . .                    0 1                    a=(0,0) b=(0,1)
        c d | . .                    2 3                    c=(1,0) d=(1,1)
        ----+----
    """
    dim = features_ND.shape[-1]
    merged, start = [], 0
    for t, h, w in grid_thw:
        item = features_ND[start:start + t * h * w].reshape(t, h, w, dim).mean(dim=0)
        groups = item.reshape(h // 2, 2, w // 2, 2, dim).permute(0, 2, 1, 3, 4)
        merged.append(groups.reshape((h // 2) * (w // 2), 4, dim))
        start += t * h * w
    if not merged:
        return features_ND.reshape(0, 4, dim)
    return torch.cat(merged, dim=0)


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
    """Multi-head self-attention with 2D RoPE, confined to packed segments."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=True)
        self.out = nn.Linear(cfg.hidden, cfg.hidden, bias=True)

    def forward(self, x_ND: Tensor, rope_angles_NR: Tensor, cu_seqlens: Tensor) -> Tensor:
        n = x_ND.shape[0]
        q_NHD, k_NHD, v_NHD = self.qkv(x_ND).reshape(n, 3, self.heads, self.head_dim).unbind(1)
        q_NHD = apply_rope_2d(q_NHD, rope_angles_NR)
        k_NHD = apply_rope_2d(k_NHD, rope_angles_NR)
        attended_NHD = segment_attention(q_NHD, k_NHD, v_NHD, cu_seqlens)
        return self.out(attended_NHD.reshape(n, self.heads * self.head_dim))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden, cfg.mlp_hidden, bias=True)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.hidden, bias=True)

    def forward(self, x_ND: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x_ND), approximate="tanh"))


class VisionBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attn_norm = LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp_norm = LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x_ND: Tensor, rope_angles_NR: Tensor, cu_seqlens: Tensor) -> Tensor:
        x_ND = x_ND + self.attn(self.attn_norm(x_ND), rope_angles_NR, cu_seqlens)
        return x_ND + self.mlp(self.mlp_norm(x_ND))


class MoonViT3D(nn.Module):
    """Packed patches of images and video chunks -> 2x2-merged, time-pooled features."""

    def __init__(self, cfg: VisionConfig):
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
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        self.final_norm = LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.reset_parameters()

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

        dtype = self.patch_embed.weight.dtype  # the compute dtype (pixels arrive in fp32)
        x_ND = self.patch_embed(patches_NP.to(dtype)) + self._position_embeddings(grids)
        rope_angles_NR = self._rope_angles(grids, x_ND.device)
        lengths = torch.tensor([t * h * w for t, h, w in grids], dtype=torch.int64)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))
        for block in self.blocks:
            x_ND = block(x_ND, rope_angles_NR, cu_seqlens)
        return merge_patches(self.final_norm(x_ND), grids)

    def _position_embeddings(self, grids: list[Grid]) -> Tensor:
        """[N, D]: the resized 2D table on every frame, plus the frame's time embedding for
        chunks (t > 1); single images get no time term, so they match image-only training."""
        per_item = []
        for t, h, w in grids:
            item_THWD = self.pos_emb(h, w).unsqueeze(0).expand(t, h, w, self.cfg.hidden)
            if t > 1:
                item_THWD = item_THWD + self.time_emb_FD[:t, None, None, :].to(item_THWD.dtype)
            per_item.append(item_THWD.reshape(t * h * w, self.cfg.hidden))
        if not per_item:
            return self.pos_emb.weight_HWD.reshape(-1, self.cfg.hidden)[:0]
        return torch.cat(per_item, dim=0)

    def _rope_angles(self, grids: list[Grid], device: torch.device) -> Tensor:
        """[N, head_dim/2]: every frame of a chunk reuses the (row, col) of its patch."""
        rows, cols = [], []
        for t, h, w in grids:
            row_THW = torch.arange(h).view(1, h, 1).expand(t, h, w)
            col_THW = torch.arange(w).view(1, 1, w).expand(t, h, w)
            rows.append(row_THW.reshape(-1))
            cols.append(col_THW.reshape(-1))
        rows_N = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        cols_N = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.int64)
        angles = rope_2d_angles(rows_N, cols_N, self.cfg.head_dim, self.cfg.rope_theta)
        return angles.to(device)
