"""MoonViT-3D and the projector: packing exactness, pooling, RoPE, pos-emb, grads, refusals."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import model.vision as vision
from model.config import VisionConfig
from model.projector import Projector
from model.vision import (MoonViT3D, Learnable2DPosEmb, apply_rope_2d, merge_patches,
                          rope_2d_angles)

torch.set_num_threads(1)

CFG = VisionConfig(hidden=32, layers=2, heads=2, mlp_hidden=64, pos_emb_height=6,
                   pos_emb_width=6, max_frames=4)
LM_HIDDEN = 24
# non-square images, one at the table size, and a 3-frame chunk
GRIDS = [(1, 4, 6), (3, 4, 4), (1, 6, 2), (1, 6, 6)]


def build(seed: int = 0) -> tuple[MoonViT3D, Projector]:
    torch.manual_seed(seed)
    return MoonViT3D(CFG), Projector(CFG.hidden, LM_HIDDEN)


def random_patches(grids, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t * h * w, CFG.patch_dim, generator=gen) for t, h, w in grids]


def test_packed_call_equals_items_alone_and_only_because_attention_is_confined(monkeypatch):
    encoder, projector = build()
    items = random_patches(GRIDS)
    packed = encoder(torch.cat(items), GRIDS)
    assert packed.shape == (sum((h // 2) * (w // 2) for _, h, w in GRIDS), 4, CFG.hidden)
    alone = torch.cat([encoder(p, [g]) for p, g in zip(items, GRIDS)])
    torch.testing.assert_close(packed, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(projector(packed), projector(alone), atol=1e-6, rtol=0)
    assert projector(packed).shape == (packed.shape[0], LM_HIDDEN)

    # DEP recomputes under grad what it first ran under no_grad: must be bitwise equal.
    with torch.no_grad():
        again = encoder(torch.cat(items), GRIDS)
    assert torch.equal(again, packed.detach())

    # The same check must fail when attention leaks across items.
    real = vision.segment_attention

    def unconfined(q, k, v, lengths, te=False):
        return real(q, k, v, [sum(lengths)], te)

    monkeypatch.setattr(vision, "segment_attention", unconfined)
    leaked = encoder(torch.cat(items), GRIDS)
    assert (leaked - alone).abs().max() > 1e-4


def test_merger_pools_frames_and_groups_2x2_in_row_major_order():
    t, h, w, dim = 4, 4, 6, 3
    gen = torch.Generator().manual_seed(2)
    frame_HWD = torch.randn(h, w, dim, generator=gen)
    chunk = frame_HWD.expand(t, h, w, dim).reshape(t * h * w, dim)
    single = frame_HWD.reshape(h * w, dim)
    torch.testing.assert_close(merge_patches(chunk, [(t, h, w)]), merge_patches(single, [(1, h, w)]),
                               atol=1e-7, rtol=0)

    # the mean over frames, and the (row pair, col pair) / (dy, dx) order, from indices
    frames = torch.arange(2 * h * w, dtype=torch.float32).reshape(2 * h * w, 1)
    merged = merge_patches(frames, [(2, h, w)])
    for group in range(merged.shape[0]):
        group_row, group_col = divmod(group, w // 2)
        for k, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            spatial = (2 * group_row + dy) * w + (2 * group_col + dx)
            expected = (spatial + (h * w + spatial)) / 2  # mean of frame 0 and frame 1
            assert merged[group, k, 0].item() == expected


def test_identical_frames_differ_from_the_image_only_through_the_time_embedding():
    encoder, _ = build()
    frame = random_patches([(1, 4, 4)])[0]
    image = encoder(frame, [(1, 4, 4)])
    chunk = encoder(frame.repeat(4, 1), [(4, 4, 4)])
    assert (chunk - image).abs().max() > 1e-3
    # without the time term, four copies of a frame attend exactly like one frame
    with torch.no_grad():
        encoder.time_emb_FD.zero_()
    torch.testing.assert_close(encoder(frame.repeat(4, 1), [(4, 4, 4)]), image, atol=1e-5, rtol=0)


def test_rope_2d_score_depends_only_on_the_row_col_offset():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, CFG.heads, CFG.head_dim, generator=gen)
    k = torch.randn(1, CFG.heads, CFG.head_dim, generator=gen)

    def score(q_pos, k_pos):
        rows = torch.tensor([q_pos[0], k_pos[0]])
        cols = torch.tensor([q_pos[1], k_pos[1]])
        angles = rope_2d_angles(rows, cols, CFG.head_dim, CFG.rope_theta)
        rq = apply_rope_2d(q, angles[:1])
        rk = apply_rope_2d(k, angles[1:])
        return (rq * rk).sum(-1)  # one score per head

    base = score((2, 5), (7, 1))
    for shift in [(3, 0), (0, 4), (5, 9)]:
        shifted = score((2 + shift[0], 5 + shift[1]), (7 + shift[0], 1 + shift[1]))
        torch.testing.assert_close(shifted, base, atol=1e-5, rtol=0)
    # both axes matter: changing only the row offset, or only the column offset, changes it
    assert (score((3, 5), (7, 1)) - base).abs().max() > 1e-3
    assert (score((2, 6), (7, 1)) - base).abs().max() > 1e-3


def cubic_weight(distance: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel (PyTorch's bicubic uses a = -0.75)."""
    x = abs(distance)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] resampling matrix: half-pixel centres (align_corners=False), edge clamp."""
    matrix = np.zeros((size_out, size_in))
    scale = size_in / size_out
    for i in range(size_out):
        source = (i + 0.5) * scale - 0.5
        base = math.floor(source)
        for tap in range(base - 1, base + 3):
            matrix[i, min(max(tap, 0), size_in - 1)] += cubic_weight(source - tap)
    return matrix


def test_position_table_is_used_as_is_at_its_size_and_resized_bicubic_otherwise():
    torch.manual_seed(4)
    table = Learnable2DPosEmb(6, 5, 3)
    torch.nn.init.normal_(table.weight_HWD)
    assert table(6, 5) is table.weight_HWD
    weight = table.weight_HWD.detach().double().numpy()
    for h, w in [(4, 8), (10, 2), (6, 7)]:
        expected = np.einsum("hH,wW,HWd->hwd", bicubic_matrix(6, h), bicubic_matrix(5, w), weight)
        torch.testing.assert_close(table(h, w).detach(), torch.from_numpy(expected).float(),
                                   atol=1e-5, rtol=0)


def test_backward_reaches_every_parameter():
    encoder, projector = build()
    patches = torch.cat(random_patches(GRIDS))
    projector(encoder(patches, GRIDS)).square().sum().backward()
    for name, param in [*encoder.named_parameters(), *projector.named_parameters()]:
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("grids, rows, message", [
    ([(1, 3, 4)], 12, "must be even"),
    ([(1, 4, 5)], 20, "must be even"),
    ([(0, 4, 4)], 0, "outside 1..4"),
    ([(5, 2, 2)], 20, "outside 1..4"),
    ([(1, 4, 4), (2, 2, 2)], 16 + 8 + 1, "needs sum"),
])
def test_bad_grids_are_refused(grids, rows, message):
    encoder, _ = build()
    with pytest.raises(ValueError, match=message):
        encoder(torch.zeros(rows, CFG.patch_dim), grids)


def test_bad_shapes_are_refused():
    encoder, projector = build()
    with pytest.raises(ValueError, match=r"expected \[N, 588\]"):
        encoder(torch.zeros(16, 10), [(1, 4, 4)])
    with pytest.raises(ValueError, match=r"expected \[M, 4, 32\]"):
        projector(torch.zeros(3, 2, CFG.hidden))
