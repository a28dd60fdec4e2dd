"""What a sample will become, decided from the index alone (no pixels, no text bytes).

The plan fixes the token layout (pieces), each media item's crop/flip/resize and so its
patch grid and placeholder count. Packing, the DEP plan and the DP split use only plans;
a worker later turns a plan into tensors. Planning is a pure function of (seed, the
sample's reference, the index, the stream config), so any process can redo it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from dataloader.augment import Geometry, plan_geometry, rng_for
from dataloader.config import LoaderConfig
from dataloader.media_decode import sample_frame_indices, video_chunks
from dataloader.shard_format import SampleIndex
from dataloader.template import Piece, layout_length, merged_tokens, truncate_layout

MAX_MEDIA_PER_SAMPLE = 1 << 8  # item_id = global sample index * 256 + media item index


class BadSample(ValueError):
    """A sample the bad-data policy must handle; the message names its object key."""


@dataclass(frozen=True)
class SampleRef:
    g: int  # global sample index (position in the blended stream)
    source: int
    k: int  # how many samples this source had given before this one
    epoch: int  # the source's epoch
    shard: int
    local: int  # index inside the shard
    uid: int  # stable id of the sample in the dataset (augmentation key)


@dataclass
class MediaPlan:
    member: str
    kind: str  # image | video
    geometry: Geometry
    chunk_frames: list[int]  # frames of each item (images: [1]; videos: chunks of <= 4)
    first_item: int  # index of its first media item in the sample
    frames: list[int]  # indices of the decoded frames in the media (images: [0])

    def chunk_source_frames(self, chunk: int) -> list[int]:
        """Frame indices (in the video) of one chunk: decode only those for that item."""
        first = sum(self.chunk_frames[:chunk])
        return self.frames[first:first + self.chunk_frames[chunk]]


@dataclass
class SamplePlan:
    ref: SampleRef
    key: str
    shard_key: str
    span: tuple[int, int]  # byte range of the sample's members in the shard
    members: dict[str, tuple[int, int]]
    pieces: list[Piece]
    media: list[MediaPlan] = field(default_factory=list)

    @cached_property  # pieces never change after planning; the packer asks often
    def length(self) -> int:
        return layout_length(self.pieces)

    @cached_property
    def num_items(self) -> int:
        return sum(1 for p in self.pieces if p.kind == "media")

    @property
    def object_key(self) -> str:
        return f"{self.shard_key}:{self.key}"


def plan_sample(entry: SampleIndex, ref: SampleRef, shard_key: str, cfg: LoaderConfig, seed: int) -> SamplePlan:
    if entry.bad:
        raise BadSample(f"{shard_key}:{entry.key}: {entry.bad}")
    pieces = [Piece("bos", 1, False)]
    media: list[MediaPlan] = []
    items = 0
    for seg in entry.segments:
        if "text" in seg:
            pieces.append(Piece("text", int(seg["tokens"]), bool(seg["loss"]), seg["text"]))
            continue
        index = len(media)
        keep = seg.get("keep") if index == 0 else None
        rng = rng_for(seed, ref.epoch, ref.uid, index) if cfg.augment else None
        geo = plan_geometry(int(seg["w"]), int(seg["h"]), max_patches=cfg.max_patches_per_image,
                            augment=cfg.augment, rng=rng, keep_box=tuple(keep) if keep else None,
                            min_crop_area=cfg.aug_min_crop_area, flip_prob=cfg.aug_flip_prob,
                            min_scale=cfg.aug_min_scale)
        h, w = geo.grid_hw
        if seg["kind"] == "image":
            chunks, frames = [1], [0]
        else:
            chunks = video_chunks(int(seg["f"]), cfg.max_video_frames)
            frames = sample_frame_indices(int(seg["f"]), cfg.max_video_frames)
        media.append(MediaPlan(seg["media"], seg["kind"], geo, chunks, items, frames))
        for c, t in enumerate(chunks):
            pieces.append(Piece("media", merged_tokens((t, h, w)), False, (index, c)))
        items += len(chunks)
    if entry.ann_tokens:
        pieces.append(Piece("ann", entry.ann_tokens, True))
    pieces.append(Piece("eos", 1, True))
    if items > MAX_MEDIA_PER_SAMPLE:
        raise BadSample(f"{shard_key}:{entry.key}: {items} media items, more than {MAX_MEDIA_PER_SAMPLE}")
    # the media cap per row also bounds one sample: cut before the first item over the cap
    kept, seen = [], 0
    for p in pieces:
        if p.kind == "media":
            seen += 1
            if seen > cfg.max_media_per_row:
                break
        kept.append(p)
    pieces = truncate_layout(kept, cfg.seq_len)
    return SamplePlan(ref, entry.key, shard_key, entry.byte_span(), entry.members, pieces, media)
