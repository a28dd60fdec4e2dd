"""Geometric augmentation that moves boxes and points with the pixels, plus colour jitter.

Coordinates are continuous pixel coordinates: pixel i covers [i, i + 1), so its centre
is i + 0.5 and an image of width W spans [0, W]. Each transform maps that space exactly:

    crop  (x0, y0, cw, ch):  x -> x - x0
    hflip (width cw):        x -> cw - x          (box x0/x1 swap)
    resize cw x ch -> W x H: x -> x * W / cw      (bilinear, antialiased when shrinking,
                                                    pixel centres map to pixel centres)

Pixels stay uint8 throughout: Pillow crops and resizes in one pass from the decoded
image (no full-resolution float copy), colour jitter works on the small output only,
and patchify is a reshape. No torch here: loader workers never import it.

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

from dataloader.blend import MASK64, splitmix64

PATCH = 14
SIDE_MULTIPLE = 28  # 2x2 merge of 14-pixel patches


class KeyedRandom:
    """A SplitMix64 sequence keyed by integers: the few draws one media item needs.

    Planning draws for every sample of every lane in the main process, where numpy's
    SeedSequence + PCG64 construction alone cost ~15x these draws; the parameters only
    need to be a deterministic, well-mixed function of the key."""

    _GOLDEN = 0x9E3779B97F4A7C15

    def __init__(self, *key: int):
        state = 0
        for k in key:
            state = splitmix64(state ^ (k & MASK64))
        self._state = state

    def _next(self) -> int:
        self._state = (self._state + self._GOLDEN) & MASK64
        return splitmix64(self._state)

    def uniform(self, low: float = 0.0, high: float = 1.0, size: int | None = None):
        if size is not None:
            return [self.uniform(low, high) for _ in range(size)]
        return low + (high - low) * ((self._next() >> 11) * 2.0 ** -53)

    def integers(self, low: int, high: int) -> int:
        """Uniform in [low, high)."""
        return low + ((self._next() * (high - low)) >> 64)


def rng_for(seed: int, epoch: int, sample_uid: int, media_index: int, purpose: int = 0) -> KeyedRandom:
    return KeyedRandom(seed, epoch, sample_uid, media_index, purpose)


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
                  rng: KeyedRandom | None = None, keep_box: tuple | None = None,
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


def apply_geometry(frames: list, g: Geometry) -> np.ndarray:
    """Crop, resize and flip PIL images (RGB); returns uint8 [T, out_h, out_w, 3]."""
    from PIL import Image

    box = (g.crop_x0, g.crop_y0, g.crop_x0 + g.crop_w, g.crop_y0 + g.crop_h)
    out = []
    for frame in frames:
        im = frame.resize((g.out_w, g.out_h), Image.Resampling.BILINEAR, box=box)
        if g.flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(np.asarray(im))
    return np.stack(out)


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


def color_jitter(pixels_THWC: np.ndarray, strength: float, rng: KeyedRandom) -> np.ndarray:
    """Brightness, contrast and saturation of uint8 frames; pixels only (coordinates do not move)."""
    if strength <= 0:
        return pixels_THWC
    b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
    x = pixels_THWC.astype(np.float32) * b
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * c + mean
    grey = x[..., 0:1] * 0.299 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114
    x = (x - grey) * s + grey
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def patchify(pixels_THWC: np.ndarray) -> np.ndarray:
    """[T, H, W, 3] -> patches [T*h*w, 3*14*14], rows (t, h, w), columns (c, y, x); same dtype.

    Only a layout change: normalisation happens on the device (batch.normalize_patches)."""
    t, hh, ww, c = pixels_THWC.shape
    h, w = hh // PATCH, ww // PATCH
    x = pixels_THWC.reshape(t, h, PATCH, w, PATCH, c).transpose(0, 1, 3, 5, 2, 4)
    return np.ascontiguousarray(x).reshape(t * h * w, c * PATCH * PATCH)
