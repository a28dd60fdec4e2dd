"""Where everything of a packed row sits, from the sample plans alone (no bytes read).

    row of seq_len:  | sample 0 ............ | sample 1 ... <img> ... | pad |
    doc_ids:           0  0  0  0  0  0  0     1  1  1  1  1  1  1     -1 -1
    position_ids:      0  1  2  3  4  5  6     0  1  2  3  4  5  6      0  0
    media items:                                     ^ (item id, grid, offset)

Positions, document ids and the media items with their placeholder offsets follow
from the plans' piece lengths, so any rank can compute them for any row (the DEP
plan needs the media of rows it does not train on), and they never depend on whether
a sample's bytes could be read: a bad sample keeps its place (materialize.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataloader.sample_plan import MAX_MEDIA_PER_SAMPLE, SamplePlan


@dataclass(frozen=True)
class PlannedItem:
    """One media item of a row, as the plan knows it before any decode."""

    item_id: int  # global sample index * MAX_MEDIA_PER_SAMPLE + item index in the sample
    grid_thw: tuple[int, int, int]
    offset: int  # first placeholder position in the row
    sample: int  # which plan of the row
    media: int  # which media of that plan
    chunk: int  # which chunk of that media (videos: groups of up to 4 frames)


def sample_offsets(plans: list[SamplePlan]) -> list[int]:
    """Start of each sample in the row."""
    offsets, at = [], 0
    for plan in plans:
        offsets.append(at)
        at += plan.length
    return offsets


def row_items(plans: list[SamplePlan]) -> list[PlannedItem]:
    """The media items of a row, in placeholder order."""
    items = []
    for i, (plan, at) in enumerate(zip(plans, sample_offsets(plans))):
        for piece in plan.pieces:
            if piece.kind == "media":
                index, chunk = piece.source
                mp = plan.media[index]
                h, w = mp.geometry.grid_hw
                t = mp.chunk_frames[chunk]
                items.append(PlannedItem(plan.ref.g * MAX_MEDIA_PER_SAMPLE + mp.first_item + chunk,
                                         (t, h, w), at, i, index, chunk))
            at += piece.length
    return items


def row_positions(plans: list[SamplePlan], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids, doc_ids) of a row: positions restart per sample, -1/0 on padding."""
    positions = np.zeros(seq_len, dtype=np.int64)
    doc_ids = np.full(seq_len, -1, dtype=np.int64)
    for doc, (plan, at) in enumerate(zip(plans, sample_offsets(plans))):
        positions[at:at + plan.length] = np.arange(plan.length)
        doc_ids[at:at + plan.length] = doc
    return positions, doc_ids
