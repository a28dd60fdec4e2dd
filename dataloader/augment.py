"""Geometric augmentation that moves boxes and points with the pixels, plus colour jitter.

Coordinates are continuous pixel coordinates: pixel i covers [i, i + 1), so its centre
is i + 0.5 and an image of width W spans [0, W]. Each transform maps that space exactly:

    crop  (x0, y0, cw, ch):  x -> x - x0
    hflip (width cw):        x -> cw - x          (box x0/x1 swap)
    resize cw x ch -> W x H: x -> x * W / cw      (bilinear, align_corners=False, same map)

All randomness comes from `rng_for(seed, epoch, sample_uid, media_index)`, never from a
worker, so every worker count and every resume draws the same parameters; and the
parameters depend only on the original size and the annotations, which the index holds,
so the packer knows the output size (hence the placeholder count) before any decode.
The crop always contains every annotation, so no box or point is lost and the count of
annotation tokens stays what the index says.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PATCH = 14
SIDE_MULTIPLE = 28  # 2x2 merge of 14-pixel patches


def rng_for(seed: int, epoch: int, sample_uid: int, media_index: int, purpose: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(
        np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, sample_uid & 0xFFFFFFFFFFFF,
                                sample_uid >> 48, media_index, purpose])))


@dataclass(frozen=True)
class Geometry:
    crop_x0: int
    crop_y0: int
    crop_w: int
    crop_h: int
    flip: bool
    out_w: int
    out_h: int

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.out_h // PATCH, self.out_w // PATCH


def fit_size(w: float, h: float, max_patches: int) -> tuple[int, int]:
    """Scale (w, h) down to at most `max_patches` patches; both sides multiples of 28."""
    patches = (w / PATCH) * (h / PATCH)
    if patches > max_patches:
        f = math.sqrt(max_patches / patches)
        w, h = w * f, h * f
    out_w = max(SIDE_MULTIPLE, int(w // SIDE_MULTIPLE) * SIDE_MULTIPLE)
    out_h = max(SIDE_MULTIPLE, int(h // SIDE_MULTIPLE) * SIDE_MULTIPLE)
    while (out_w // PATCH) * (out_h // PATCH) > max_patches:  # the 28-pixel floor of a thin side
        if out_w >= out_h and out_w > SIDE_MULTIPLE:
            out_w -= SIDE_MULTIPLE
        elif out_h > SIDE_MULTIPLE:
            out_h -= SIDE_MULTIPLE
        else:
            break
    return out_w, out_h


def plan_geometry(width: int, height: int, *, max_patches: int, augment: bool,
                  rng: np.random.Generator | None = None, keep_box: tuple | None = None,
                  min_crop_area: float = 0.6, flip_prob: float = 0.5,
                  min_scale: float = 0.75) -> Geometry:
    """Parameters of the crop/flip/resize for one image (or every frame of one video).

    keep_box: (x0, y0, x1, y1) that the crop must contain (the union of annotations).
    """
    if not augment:
        out_w, out_h = fit_size(width, height, max_patches)
        return Geometry(0, 0, width, height, False, out_w, out_h)
    assert rng is not None
    area = width * height * rng.uniform(min_crop_area, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = int(round(math.sqrt(area * aspect)))
    ch = int(round(math.sqrt(area / aspect)))
    kx0, ky0, kx1, ky1 = 0, 0, 0, 0
    if keep_box is not None:
        kx0, ky0 = max(0, math.floor(keep_box[0])), max(0, math.floor(keep_box[1]))
        kx1, ky1 = min(width, math.ceil(keep_box[2])), min(height, math.ceil(keep_box[3]))
        cw, ch = max(cw, kx1 - kx0), max(ch, ky1 - ky0)
    cw, ch = max(1, min(cw, width)), max(1, min(ch, height))
    if keep_box is not None:
        lo_x, hi_x = max(0, kx1 - cw), min(kx0, width - cw)
        lo_y, hi_y = max(0, ky1 - ch), min(ky0, height - ch)
    else:
        lo_x, hi_x, lo_y, hi_y = 0, width - cw, 0, height - ch
    x0 = int(rng.integers(lo_x, hi_x + 1))
    y0 = int(rng.integers(lo_y, hi_y + 1))
    flip = bool(rng.uniform() < flip_prob)
    scale = rng.uniform(min_scale, 1.0)
    out_w, out_h = fit_size(cw * scale, ch * scale, max_patches)
    return Geometry(x0, y0, cw, ch, flip, out_w, out_h)


def apply_geometry(frames_THWC: np.ndarray, g: Geometry) -> torch.Tensor:
    """Crop, flip and resize frames (uint8, or float in [0, 1]); returns float32
    [T, 3, out_h, out_w] in [0, 1]. The crop comes first, so only the cropped pixels are
    converted to float."""
    crop = frames_THWC[:, g.crop_y0:g.crop_y0 + g.crop_h, g.crop_x0:g.crop_x0 + g.crop_w]
    x_T3HW = torch.from_numpy(np.require(crop, requirements=["C", "W"])).permute(0, 3, 1, 2)
    x_T3HW = x_T3HW.float() / 255.0 if x_T3HW.dtype == torch.uint8 else x_T3HW.float()
    if g.flip:
        x_T3HW = x_T3HW.flip(-1)
    if (g.out_h, g.out_w) != tuple(x_T3HW.shape[-2:]):
        antialias = g.out_h < x_T3HW.shape[-2] or g.out_w < x_T3HW.shape[-1]
        x_T3HW = F.interpolate(x_T3HW, size=(g.out_h, g.out_w), mode="bilinear",
                               align_corners=False, antialias=antialias)
    return x_T3HW.clamp_(0.0, 1.0)


def transform_points(points: list, g: Geometry) -> list:
    """[x, y, label] in original pixels -> the same in output pixels."""
    sx, sy = g.out_w / g.crop_w, g.out_h / g.crop_h
    out = []
    for x, y, label in points:
        x, y = x - g.crop_x0, y - g.crop_y0
        if g.flip:
            x = g.crop_w - x
        out.append([x * sx, y * sy, label])
    return out


def transform_boxes(boxes: list, g: Geometry) -> list:
    """[x0, y0, x1, y1, label] in original pixels -> the same in output pixels (x0 <= x1)."""
    out = []
    for x0, y0, x1, y1, label in boxes:
        (ax, ay, _), (bx, by, _) = transform_points([[x0, y0, None], [x1, y1, None]], g)
        out.append([min(ax, bx), min(ay, by), max(ax, bx), max(ay, by), label])
    return out


def color_jitter(x_T3HW: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation; pixels only (coordinates do not move)."""
    if strength <= 0:
        return x_T3HW
    b, c, s = (float(v) for v in rng.uniform(1 - strength, 1 + strength, size=3))
    x = x_T3HW * b
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * c + mean
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - grey) * s + grey
    return x.clamp_(0.0, 1.0)


def to_pixels(x_T3HW: torch.Tensor) -> torch.Tensor:
    """Float in [0, 1] -> uint8 pixels (rounded): what queues, caches and ranks carry."""
    return x_T3HW.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def patchify(x_T3HW: torch.Tensor) -> torch.Tensor:
    """[T, 3, H, W] -> patches [T*h*w, 3*14*14], rows (t, h, w), cols (c, y, x); same dtype.

    Only a layout change: normalisation happens on the device (batch.normalize_patches)."""
    t, c, hh, ww = x_T3HW.shape
    h, w = hh // PATCH, ww // PATCH
    x = x_T3HW.reshape(t, c, h, PATCH, w, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(t * h * w, c * PATCH * PATCH).contiguous()
