"""The batch contract: what the data loader produces and the trainer consumes.

One `Batch` holds `B` packed sequences of length `S` for one data-parallel
replica and one step. Several documents share a row; each restarts its
positions and attends only to itself:

    row b:   | doc 0 ........ | doc 1 ...  <img><img><img> ... | doc 2 . | pad |
    doc_ids:   0  0  0  0  0    1  1  1  1   1    1    1  1  1   2  2  2  -1 -1
    position:  0  1  2  3  4    0  1  2  3   4    5    6  7  8   0  1  2   0  0
    labels:    next token, or -100 on placeholders, padding and masked prompt parts

Labels are already shifted: `labels[b, s]` is the token the model must predict
after reading positions `<= s` of row `b` (-100 where there is no loss, which
includes the last position of every document). The loss is the sum of the
cross-entropy over all labelled positions of the *global* batch divided by
their count, however the batch is split over microbatches and ranks.

Media: every image (t = 1) or spatiotemporal chunk of up to 4 video frames is
one `MediaItem`. Its pixels come pre-patchified: `patches` has one row per
14x14 patch, ordered frame-major then row-major (t, h, w), each row the
flattened (channel, y, x) pixels. After the 2x2 patch merger and temporal
mean pooling it becomes `(h // 2) * (w // 2)` LM embeddings, which replace the
same number of consecutive placeholder tokens starting at `(row, offset)`.

Pixels stay uint8 (0..255) from the decoder to the device, 4x fewer bytes in
queues and caches than float32; `normalize_patches` turns them into model input
there. Float patches are already model input (the synthetic generator makes
those) and pass through unchanged. `patches` is None when this rank did not
decode the item: only the ranks that run the encoder on it do (DEP: the rank the
plan assigns it to; colocated: pipeline stage 0).

`Batch.group` (DEP only) carries what the plan of the step needs beyond this
replica's rows: the metadata of every media item of the replicas whose media
one DEP plan balances, computed by this rank's loader from the dataset index
(no pixels, nothing gathered from other ranks), and the pixels of the items of
that group this rank was asked to decode.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dataloader.template import IGNORE_INDEX, merged_tokens  # the label and placeholder conventions

PIXEL_MEAN, PIXEL_STD = 0.5, 0.5  # of pixels scaled to [0, 1]


def normalize_patches(patches: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 model input ((x / 255 - mean) / std), on the tensor's device.

    Float patches are taken as already normalised and returned unchanged."""
    if patches.dtype != torch.uint8:
        return patches
    return (patches.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD


@dataclass
class MediaItem:
    """One image or video chunk and where its placeholders sit in the batch."""

    item_id: int  # unique within the global batch; the DEP plan sorts and ties on it
    grid_thw: tuple[int, int, int]  # frames (1..4), patch rows, patch columns (both even)
    row: int  # sequence index inside the batch
    offset: int  # position of the first placeholder token in that row
    patches: torch.Tensor | None = None  # [t*h*w, 3*14*14] uint8 pixels (or float model input);
    # None where this rank does not decode the item

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    @property
    def num_tokens(self) -> int:
        return merged_tokens(self.grid_thw)


@dataclass
class GroupMedia:
    """One step's media over the replicas whose media one DEP plan balances (DEP only).

    Derived by every rank from the index alone, so the plan built from it can be
    compared across ranks (a rank whose loader diverged shows another digest)."""

    step: int
    items: list[tuple[int, MediaItem]]  # (replica, item): row and offset within that replica's rows
    pixels: dict[int, torch.Tensor]  # item_id -> uint8 patches of the items this rank decodes
    rows_digest: str  # sha256 of the planned rows of the group (sample ids and lengths)


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, S] int64 token ids (media placeholders hold the media token id)
    labels: torch.Tensor  # [B, S] int64 shifted targets, IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # [B, S] int64, restart at 0 for every document
    doc_ids: torch.Tensor  # [B, S] int64 document index within the row, -1 on padding
    media: list[MediaItem] = field(default_factory=list)
    group: GroupMedia | None = None

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def rows(self, start: int, stop: int) -> "Batch":
        """Rows [start, stop) as a batch of their own (microbatching, DP slicing)."""
        media = [
            MediaItem(m.item_id, m.grid_thw, m.row - start, m.offset, m.patches)
            for m in self.media if start <= m.row < stop
        ]
        return Batch(self.tokens[start:stop], self.labels[start:stop],
                     self.position_ids[start:stop], self.doc_ids[start:stop], media)

    def validate(self, media_token_id: int) -> None:
        """Check the contract; raise ValueError naming the first violation."""
        shape = self.tokens.shape
        for name in ("labels", "position_ids", "doc_ids"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"batch.{name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"tokens has {tuple(shape)}")
        placeholder = self.tokens == media_token_id
        covered = torch.zeros_like(placeholder)
        for m in self.media:
            t, h, w = m.grid_thw
            if not 1 <= t <= 4 or h % 2 or w % 2 or h <= 0 or w <= 0:
                raise ValueError(f"media item {m.item_id}: grid {m.grid_thw} needs 1..4 frames "
                                 "and an even, positive number of patch rows and columns")
            if m.patches is not None and m.patches.shape[0] != m.num_patches:
                raise ValueError(f"media item {m.item_id}: {m.patches.shape[0]} patch rows, "
                                 f"grid {m.grid_thw} needs {m.num_patches}")
            end = m.offset + m.num_tokens
            if not (0 <= m.row < shape[0] and 0 <= m.offset and end <= shape[1]):
                raise ValueError(f"media item {m.item_id}: placeholders [{m.offset}, {end}) of "
                                 f"row {m.row} fall outside the batch {tuple(shape)}")
            span = placeholder[m.row, m.offset:end]
            if not bool(span.all()) or bool(covered[m.row, m.offset:end].any()):
                raise ValueError(f"media item {m.item_id}: positions [{m.offset}, {end}) of row "
                                 f"{m.row} are not free media placeholder tokens")
            covered[m.row, m.offset:end] = True
        if not bool((covered == placeholder).all()):
            raise ValueError("batch has media placeholder tokens that no media item fills")
        if bool((self.labels[placeholder] != IGNORE_INDEX).any()):
            raise ValueError("batch has a loss label on a media placeholder position")
        if bool((self.labels == media_token_id).any()):
            raise ValueError("batch asks the model to predict the media placeholder token")
