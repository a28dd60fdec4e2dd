"""Augmentation keeps boxes and points on the pixels they annotate."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dataloader.augment import (
    apply_geometry, fit_size, patchify, plan_geometry, rng_for, transform_boxes, transform_points)


def coordinate_image(w: int, h: int) -> Image.Image:
    """Red encodes x, green encodes y: pixel (i, j) holds ((i + .5) / w, (j + .5) / h, .5) x 255."""
    xs = (np.arange(w) + 0.5) / w
    ys = (np.arange(h) + 0.5) / h
    img = np.zeros((h, w, 3), dtype=np.float32)
    img[:, :, 0] = xs[None, :]
    img[:, :, 1] = ys[:, None]
    img[:, :, 2] = 0.5
    return Image.fromarray(np.rint(img * 255).astype(np.uint8))


def colour_at(x_3HW, x: float, y: float) -> tuple[float, float]:
    """Bilinear read of the colour at continuous output coordinates (x, y)."""
    h, w = x_3HW.shape[-2:]
    grid = torch_grid(x, y, w, h)
    v = F.grid_sample(x_3HW[None], grid, mode="bilinear", align_corners=False, padding_mode="border")
    return float(v[0, 0, 0, 0]), float(v[0, 1, 0, 0])


def torch_grid(x, y, w, h):
    return torch.tensor([[[[2 * x / w - 1, 2 * y / h - 1]]]], dtype=torch.float32)


@pytest.mark.parametrize("sample", range(12))
def test_transformed_boxes_and_points_decode_to_original_coordinates(sample):
    w, h = 230, 170
    img = coordinate_image(w, h)
    boxes = [[40.0, 30.0, 120.0, 90.0, "a"], [150.0, 100.0, 200.0, 150.0, "b"]]
    points = [[60.5, 70.25, "p"], [180.0, 120.0, "q"]]
    keep = (40.0, 30.0, 200.0, 150.0)
    geo = plan_geometry(w, h, max_patches=256, augment=True, rng=rng_for(1, 0, sample, 0), keep_box=keep,
                        min_crop_area=0.3, flip_prob=0.5, min_scale=0.5)
    pixels = apply_geometry([img], geo)[0]
    assert pixels.shape == (geo.out_h, geo.out_w, 3) and pixels.dtype == np.uint8
    assert geo.out_w % 28 == 0 and geo.out_h % 28 == 0
    out = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    # one output pixel, plus the uint8 rounding of the encoded coordinate (half a level)
    tol_x = 1.5 * geo.crop_w / geo.out_w + 1 + w / 510
    tol_y = 1.5 * geo.crop_h / geo.out_h + 1 + h / 510
    new_points = transform_points(points, geo)
    new_boxes = transform_boxes(boxes, geo)
    corners_before = [(b[0], b[1]) for b in boxes] + [(b[2], b[3]) for b in boxes] + [(p[0], p[1]) for p in points]
    corners_after = ([(b[0], b[1]) for b in new_boxes] + [(b[2], b[3]) for b in new_boxes]
                     + [(p[0], p[1]) for p in new_points])
    if geo.flip:  # a flip swaps which original corner is the new left one
        corners_after = ([(b[2], b[1]) for b in new_boxes] + [(b[0], b[3]) for b in new_boxes]
                         + [(p[0], p[1]) for p in new_points])
    for (ox, oy), (nx, ny) in zip(corners_before, corners_after):
        assert 0 <= nx <= geo.out_w and 0 <= ny <= geo.out_h, "annotation left the image"
        r, g = colour_at(out, nx, ny)
        assert abs(r * w - ox) <= tol_x and abs(g * h - oy) <= tol_y, (
            f"colour at transformed ({nx:.1f}, {ny:.1f}) decodes to ({r * w:.1f}, {g * h:.1f}), "
            f"expected ({ox}, {oy}); geometry {geo}")


def test_geometry_is_keyed_by_sample_not_by_call_order():
    a = [plan_geometry(300, 200, max_patches=64, augment=True, rng=rng_for(1, e, uid, 0)) for uid in range(5) for e in range(2)]
    b = [plan_geometry(300, 200, max_patches=64, augment=True, rng=rng_for(1, e, uid, 0)) for uid in reversed(range(5)) for e in range(2)]
    assert a == [b[(4 - i // 2) * 2 + i % 2] for i in range(10)]
    assert len(set(a)) > 5, "different samples and epochs must draw different parameters"


def test_fit_size_caps_patches_and_keeps_multiples_of_28():
    for w, h, cap in ((1000, 30, 64), (30, 1000, 16), (512, 512, 256), (56, 56, 4), (20, 20, 4)):
        ow, oh = fit_size(w, h, cap)
        assert ow % 28 == 0 and oh % 28 == 0 and (ow // 14) * (oh // 14) <= cap


def test_patchify_layout_is_frame_major_then_row_major_and_pixels_stay_uint8():
    from dataloader.batch import normalize_patches

    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 28, 42, 3), dtype=np.uint8)  # T H W C
    p = patchify(pixels)
    assert p.shape == (2 * 2 * 3, 3 * 14 * 14) and p.dtype == np.uint8
    t, i, j = 1, 1, 2  # frame 1, patch row 1, patch column 2
    row = p[t * 6 + i * 3 + j].reshape(3, 14, 14)  # (c, y, x)
    assert np.array_equal(row, pixels[t, 14 * i:14 * i + 14, 14 * j:14 * j + 14].transpose(2, 0, 1))
    # normalised where the model runs: (x / 255 - 0.5) / 0.5; float patches pass through
    p = torch.from_numpy(p)
    assert torch.allclose(normalize_patches(p), (p.float() / 255 - 0.5) / 0.5)
    assert normalize_patches(p.float()).equal(p.float())


def test_colour_jitter_moves_pixels_not_their_range():
    from dataloader.augment import color_jitter

    pixels = np.random.default_rng(1).integers(0, 256, size=(2, 28, 28, 3), dtype=np.uint8)
    out = color_jitter(pixels, 0.4, rng_for(1, 0, 7, 0, 1))
    assert out.dtype == np.uint8 and out.shape == pixels.shape and not np.array_equal(out, pixels)
    assert np.array_equal(out, color_jitter(pixels, 0.4, rng_for(1, 0, 7, 0, 1))), "keyed, not random"
    assert color_jitter(pixels, 0.0, rng_for(1, 0, 7, 0, 1)) is pixels


def test_loader_workers_never_import_torch():
    """The worker side (materialize and everything it uses) is torch-free: a worker starts
    in a fraction of a second and without torch's ~200 MB."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, dataloader.materialize, dataloader.worker_pool; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
