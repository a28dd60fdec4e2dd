"""Turns planned rows and planned media items into arrays: fetch bytes, tokenize, decode.

Two kinds of work, so that each rank does only what it needs:

    row(plans)       token ids and labels of one packed row (+ positions and doc ids,
                     which follow from the plans): reads only the text and JSON members;
                     every pipeline stage of a replica needs these, none needs pixels
    media(request)   uint8 patches of some items of one image or video: reads only that
                     media member and decodes only the frames of those items; only the
                     rank that encodes the items does this (DEP: the plan's encoder rank;
                     colocated: pipeline stage 0)

Runs in loader workers (or in the calling process with data.workers=0). Everything
random is keyed by (seed, epoch, sample uid, media index), so the result does not depend
on which process or rank runs it. Nothing on this side imports torch (numpy arrays out):
a worker starts without loading it (seconds and ~200 MB per worker).

Bad data found here (a corrupt image, malformed JSON, a missing object, a token count
that disagrees with the index) follows the bad-data policy. "fail" raises naming the
key. "skip" reports the key and keeps the row's layout, because other ranks planned it
from the index alone and cannot know: a sample whose text cannot be read keeps its
positions, document id and media placeholders but all its other tokens become padding
and none of its tokens has a loss; a media item that cannot be decoded becomes a
uniform grey image of its planned size. Either way the rest of the stream is unchanged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from dataloader.augment import apply_geometry, color_jitter, patchify, rng_for, transform_boxes, transform_points
from dataloader.config import LoaderConfig
from dataloader.media_decode import BadMedia, decode_image, decode_video
from dataloader.row_layout import row_positions, sample_offsets
from dataloader.sample_plan import BadSample, SamplePlan
from dataloader.shard_format import member_kind
from dataloader.store import StoreError
from dataloader.template import IGNORE_INDEX, TextTokenizer, annotation_text
from dataloader.tiered_reader import TieredReader, make_reader

BLANK_PIXEL = 128  # what an undecodable item shows under bad_data=skip (grey: ~0 after normalising)


@dataclass
class RowResult:
    tokens: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    doc_ids: np.ndarray
    skipped: list = field(default_factory=list)  # (object key, reason)


@dataclass
class MediaRequest:
    """Items of one media (an image, or chunks of one video) of one sample to decode."""

    plan: SamplePlan
    media: int  # index of the media in the plan
    chunks: list[int]  # which chunks (images: [0])
    item_ids: list[int]  # one per chunk
    whole_shard: bool  # the node reads this shard anyway (own rows): fetch it whole


@dataclass
class MediaResult:
    patches: list  # per item of the request: uint8 [t*h*w, 3*14*14]
    skipped: list = field(default_factory=list)  # (object key, reason)


def _is_media(member: str) -> bool:
    return member_kind(member) in ("image", "video")


class Materializer:
    def __init__(self, reader: TieredReader, tokenizer: TextTokenizer, cfg: LoaderConfig, seed: int):
        self.reader, self.tok, self.cfg, self.seed = reader, tokenizer, cfg, seed

    def _members(self, plan: SamplePlan, names: list[str], whole_shard: bool) -> dict[str, bytes]:
        """The bytes of some members of a sample, with one read covering all of them."""
        if not names:
            return {}
        spans = [plan.members[n] for n in names]
        start = min(o for o, _ in spans)
        end = max(o + s for o, s in spans)
        try:
            blob = (self.reader.span(plan.shard_key, start, end) if whole_shard
                    else self.reader.part(plan.shard_key, start, end))
        except StoreError as e:
            raise BadSample(f"{plan.object_key}: {e}") from e
        return {n: blob[o - start:o - start + s] for n, (o, s) in zip(names, spans)}

    # --- token rows ------------------------------------------------------------------
    def _texts(self, plan: SamplePlan) -> list[str]:
        """The strings of the plan's text and annotation pieces, in piece order."""
        members = self._members(plan, [n for n in plan.members if not _is_media(n)], whole_shard=True)
        meta, segments = {}, None
        if "json" in members:
            try:
                meta = json.loads(members["json"])
                segments = meta["segments"]
            except (ValueError, KeyError, TypeError) as e:
                raise BadSample(f"{plan.object_key}.json: malformed JSON member ({e})") from e
        texts = []
        for piece in plan.pieces:
            if piece.kind == "text":
                if piece.source == "txt":
                    texts.append(members["txt"].decode("utf-8", "replace"))
                else:
                    try:
                        texts.append(segments[int(piece.source)]["text"])
                    except (IndexError, KeyError, TypeError) as e:
                        raise BadSample(f"{plan.object_key}.json: malformed JSON member ({e})") from e
            elif piece.kind == "ann":
                texts.append(self._annotation(plan, meta))
        return texts

    def _annotation(self, plan: SamplePlan, meta: dict) -> str:
        if not plan.media:
            raise BadSample(f"{plan.object_key}: annotations without media")
        g = plan.media[0].geometry
        try:
            boxes = transform_boxes(meta.get("boxes", []), g)
            points = transform_points(meta.get("points", []), g)
        except (TypeError, ValueError) as e:
            raise BadSample(f"{plan.object_key}.json: malformed boxes/points ({e})") from e
        return annotation_text(boxes, points, g.out_w, g.out_h)

    def _bad(self, e: BadSample, plan: SamplePlan, out) -> None:
        if self.cfg.bad_data == "fail":
            raise BadSample(f"bad data (data.bad_data=fail): {e}") from e
        out.skipped.append((plan.object_key, str(e)))

    def _sample_ids(self, plan: SamplePlan, texts_ids: list[list[int]]) -> tuple[list[int], list[bool]]:
        """(token ids, target flags) of one sample, given the ids of its texts in piece order."""
        ids: list[int] = []
        targets: list[bool] = []
        texts = iter(texts_ids)
        for piece in plan.pieces:
            if piece.kind == "bos":
                piece_ids = [self.tok.bos_id]
            elif piece.kind == "eos":
                piece_ids = [self.tok.eos_id]
            elif piece.kind == "media":
                piece_ids = [self.tok.media_id] * piece.length
            else:
                piece_ids = next(texts)[:piece.length]
                if len(piece_ids) != piece.length:
                    raise BadSample(f"{plan.object_key}: {piece.kind} text has {len(piece_ids)} tokens, "
                                    "the index says more; rebuild the index with this tokenizer")
            ids.extend(piece_ids)
            targets.extend([piece.loss] * len(piece_ids))
        return ids, targets

    def row(self, plans: list[SamplePlan]) -> RowResult:
        s = self.cfg.seq_len
        tokens = np.full(s, self.tok.pad_id, dtype=np.int64)
        labels = np.full(s, IGNORE_INDEX, dtype=np.int64)
        out = RowResult(tokens, labels, *row_positions(plans, s))
        texts: list[list[str] | None] = []
        for plan in plans:
            try:
                texts.append(self._texts(plan))
            except BadSample as e:
                self._bad(e, plan, out)
                texts.append(None)
        flat = [t for sample in texts if sample is not None for t in sample]
        encoded = iter(self.tok.encode_batch(flat) if flat else [])  # one tokenizer call per row
        for plan, at, sample_texts in zip(plans, sample_offsets(plans), texts):
            ids = None
            if sample_texts is not None:
                texts_ids = [next(encoded) for _ in sample_texts]
                try:
                    ids, targets = self._sample_ids(plan, texts_ids)
                except BadSample as e:
                    self._bad(e, plan, out)
            if ids is None:  # keep the layout: placeholders stay, no loss anywhere
                for piece in plan.pieces:
                    if piece.kind == "media":
                        tokens[at:at + piece.length] = self.tok.media_id
                    at += piece.length
                continue
            length = plan.length
            tokens[at:at + length] = ids
            tgt = np.asarray(targets, dtype=bool)
            nxt = np.asarray(ids[1:], dtype=np.int64)
            # no loss on a placeholder position either (the contract: its output is an image slot)
            cur_is_text = np.asarray(ids[:-1], dtype=np.int64) != self.tok.media_id
            labels[at:at + length - 1] = np.where(tgt[1:] & cur_is_text, nxt, IGNORE_INDEX)
        return out

    # --- media -----------------------------------------------------------------------
    def media(self, request: MediaRequest) -> MediaResult:
        plan, mp = request.plan, request.plan.media[request.media]
        out = MediaResult([])
        h, w = mp.geometry.grid_hw
        try:
            if mp.member not in plan.members:
                raise BadSample(f"{plan.object_key}.{mp.member}: media member missing")
            data = self._members(plan, [mp.member], request.whole_shard)[mp.member]
            wanted = [f for c in request.chunks for f in mp.chunk_source_frames(c)]
            try:
                frames = decode_image(data) if mp.kind == "image" else decode_video(data, wanted)
            except BadMedia as e:
                raise BadSample(f"{plan.object_key}.{mp.member}: {e}") from e
            g = mp.geometry
            width, height = frames[0].size
            if width < g.crop_x0 + g.crop_w or height < g.crop_y0 + g.crop_h:
                raise BadSample(f"{plan.object_key}.{mp.member}: decoded size {width}x{height} "
                                "differs from the index")
            pixels = apply_geometry(frames, g)
            if self.cfg.augment and self.cfg.aug_color_jitter > 0:
                pixels = color_jitter(pixels, self.cfg.aug_color_jitter,
                                      rng_for(self.seed, plan.ref.epoch, plan.ref.uid, request.media, 1))
            first = 0
            for c in request.chunks:
                t = mp.chunk_frames[c]
                out.patches.append(patchify(pixels[first:first + t]))
                first += t
        except BadSample as e:
            self._bad(e, plan, out)
            out.patches = [np.full((mp.chunk_frames[c] * h * w, 3 * 14 * 14), BLANK_PIXEL, dtype=np.uint8)
                           for c in request.chunks]
        return out


def make_materializer(cfg: LoaderConfig, seed: int, tokenizer_bytes: bytes, version: str = "") -> Materializer:
    """A worker's materializer: its own reader (store clients are made in the process that
    uses them, never inherited; `version` keys the disk cache, Dataset.version) and tokenizer."""
    return Materializer(make_reader(cfg, version), TextTokenizer(data=tokenizer_bytes), cfg, seed)
