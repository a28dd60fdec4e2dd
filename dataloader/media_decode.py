"""Decoding of native-format media bytes (JPEG/PNG/... with Pillow, MP4/WebM with PyAV).

Errors surface as `BadMedia` so the loader's bad-data policy can name the object key.
Video frames are sampled evenly (the same indices on every run) up to a cap; decoding
converts only the frames asked for and stops after the last of them. Frames come out as
RGB Pillow images, which augment.py crops and resizes without a full-size copy.
"""
from __future__ import annotations

import io

import numpy as np


class BadMedia(ValueError):
    pass


def probe_image(data: bytes) -> tuple[int, int]:
    """(width, height), decoding the whole image so that truncation is caught at write time."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.size
    except Exception as e:  # Pillow raises many types for bad bytes
        raise BadMedia(f"undecodable image: {e}") from e


def decode_image(data: bytes) -> list:
    """[the image] as one RGB Pillow image."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))  # in memory: no file to close
        im.load()
        return [im if im.mode == "RGB" else im.convert("RGB")]
    except Exception as e:
        raise BadMedia(f"undecodable image: {e}") from e


def sample_frame_indices(num_frames: int, max_frames: int) -> list[int]:
    if num_frames <= max_frames:
        return list(range(num_frames))
    return [int((i + 0.5) * num_frames / max_frames) for i in range(max_frames)]


def _video_frames(data: bytes) -> list[np.ndarray]:
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as e:
        raise BadMedia(f"undecodable video: {e}") from e


def probe_video(data: bytes) -> tuple[int, int, int]:
    """(width, height, frames)."""
    frames = _video_frames(data)
    if not frames:
        raise BadMedia("video has no frames")
    h, w, _ = frames[0].shape
    return w, h, len(frames)


def decode_video(data: bytes, frames: list[int]) -> list:
    """RGB Pillow images of the frames at these (increasing) indices of the stream.

    Frames before the last wanted one are decoded (a codec needs them) but only the
    wanted ones are converted to RGB, and decoding stops after the last."""
    import av

    wanted = {f: i for i, f in enumerate(frames)}
    out: list = [None] * len(frames)
    last = max(frames) if frames else -1
    try:
        with av.open(io.BytesIO(data)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    out[wanted[index]] = frame.to_image()
                if index >= last:
                    break
    except Exception as e:
        raise BadMedia(f"undecodable video: {e}") from e
    if any(f is None for f in out):
        raise BadMedia(f"video has fewer frames than the index says (wanted frame {last})")
    return out


def video_chunks(num_frames: int, max_frames: int, chunk: int = 4) -> list[int]:
    """Frame counts of the spatiotemporal chunks of a video (each 1..4 frames)."""
    t = min(num_frames, max_frames)
    return [min(chunk, t - s) for s in range(0, t, chunk)]
