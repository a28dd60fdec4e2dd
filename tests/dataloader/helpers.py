"""Helpers for comparing loader streams row by row and batch by batch."""
from __future__ import annotations

import torch

from dataloader.batch import Batch
from dataloader.config import LoaderConfig


def tiny_config(uri: str, **overrides) -> LoaderConfig:
    base = dict(uri=uri, seq_len=192, pack_buffer=8, shuffle_window=12, max_patches_per_image=64,
                max_media_per_row=8, max_video_frames=8, workers=0, prefetch=2)
    base.update(overrides)
    return LoaderConfig(**base)


def batch_rows(batch: Batch) -> list[tuple]:
    """One comparable record per row: token/label/position/doc bytes and its media with pixels."""
    rows = []
    for r in range(batch.num_rows):
        media = tuple((m.item_id, m.grid_thw, m.offset, m.patches.numpy().tobytes())
                      for m in batch.media if m.row == r)
        rows.append((batch.tokens[r].numpy().tobytes(), batch.labels[r].numpy().tobytes(),
                     batch.position_ids[r].numpy().tobytes(), batch.doc_ids[r].numpy().tobytes(), media))
    return rows


def take_rows(loader, steps: int) -> list[tuple]:
    rows = []
    for _ in range(steps):
        rows.extend(batch_rows(next(loader)))
    return rows


def assert_same_rows(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        names = ("tokens", "labels", "position_ids", "doc_ids", "media")
        for name, x, y in zip(names, a, b):
            assert x == y, f"row {i}: {name} differs"
