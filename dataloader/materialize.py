"""Turns planned rows into tensors: fetch bytes, decode, augment, tokenize, lay out.

Runs in loader workers (or in the calling process with data.workers=0). Everything
random is keyed by (seed, epoch, sample uid, media index), so the result does not depend
on which process runs it. A sample that fails here (corrupt image, malformed JSON,
missing object, a token count that disagrees with the index) follows the bad-data
policy: "skip" leaves its planned span as padding (no loss, doc id -1) and reports the
key; "fail" raises naming the key. Either way the rest of the stream is unchanged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from dataloader.augment import apply_geometry, color_jitter, patchify, rng_for, transform_boxes, transform_points
from dataloader.batch import IGNORE_INDEX
from dataloader.config import LoaderConfig
from dataloader.media_decode import BadMedia, decode_image, decode_video
from dataloader.sample_plan import MAX_MEDIA_PER_SAMPLE, BadSample, SamplePlan
from dataloader.store import StoreError
from dataloader.template import TextTokenizer, annotation_text
from dataloader.tiered_reader import TieredReader


@dataclass
class RowResult:
    tokens: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    doc_ids: np.ndarray
    media: list = field(default_factory=list)  # (item_id, grid_thw, offset, patches float32 array)
    skipped: list = field(default_factory=list)  # (object key, reason)


class Materializer:
    def __init__(self, reader: TieredReader, tokenizer: TextTokenizer, cfg: LoaderConfig, seed: int):
        self.reader, self.tok, self.cfg, self.seed = reader, tokenizer, cfg, seed

    def _members(self, plan: SamplePlan) -> dict[str, bytes]:
        start, end = plan.span
        blob = self.reader.span(plan.shard_key, start, end)
        return {name: blob[o - start:o - start + s] for name, (o, s) in plan.members.items()}

    def sample(self, plan: SamplePlan) -> tuple[list[int], list[bool], list]:
        """(token ids, target flags, media items as (item index, grid, offset, patches))."""
        try:
            members = self._members(plan)
        except StoreError as e:
            raise BadSample(f"{plan.object_key}: {e}") from e
        meta = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"])
                segments = meta["segments"]
            except (ValueError, KeyError, TypeError) as e:
                raise BadSample(f"{plan.object_key}.json: malformed JSON member ({e})") from e
        tokens: list[int] = []
        targets: list[bool] = []
        media_out = []
        decoded: dict[int, torch.Tensor] = {}
        for piece in plan.pieces:
            if piece.kind == "bos":
                ids = [self.tok.bos_id]
            elif piece.kind == "eos":
                ids = [self.tok.eos_id]
            elif piece.kind == "text":
                if piece.source == "txt":
                    text = members["txt"].decode("utf-8", "replace")
                else:
                    try:
                        text = segments[int(piece.source)]["text"]
                    except (IndexError, KeyError, TypeError) as e:
                        raise BadSample(f"{plan.object_key}.json: malformed JSON member ({e})") from e
                ids = self.tok.encode(text)[:piece.length]
                if len(ids) != piece.length:
                    raise BadSample(f"{plan.object_key}: text has {len(ids)} tokens, the index says more; "
                                    "rebuild the index with this tokenizer")
            elif piece.kind == "ann":
                ids = self._annotation(plan, meta, members)[:piece.length]
                if len(ids) != piece.length:
                    raise BadSample(f"{plan.object_key}: annotation has {len(ids)} tokens, index says more")
            else:  # media
                index, chunk = piece.source
                if index not in decoded:
                    decoded[index] = self._media(plan, index, members)
                mp = plan.media[index]
                h, w = mp.geometry.grid_hw
                t = mp.chunk_frames[chunk]
                first = sum(mp.chunk_frames[:chunk])  # frames of the earlier chunks
                frames = decoded[index][first:first + t]
                if frames.shape[0] != t:
                    raise BadSample(f"{plan.object_key}.{mp.member}: fewer frames than the index says")
                media_out.append((mp.first_item + chunk, (t, h, w), len(tokens), patchify(frames).numpy()))
                ids = [self.tok.media_id] * piece.length
            tokens.extend(ids)
            targets.extend([piece.loss] * len(ids))
        return tokens, targets, media_out

    def _media(self, plan: SamplePlan, index: int, members: dict[str, bytes]) -> torch.Tensor:
        mp = plan.media[index]
        if mp.member not in members:
            raise BadSample(f"{plan.object_key}.{mp.member}: media member missing")
        try:
            if mp.kind == "image":
                frames = decode_image(members[mp.member])
            else:
                frames = decode_video(members[mp.member], self.cfg.max_video_frames)
        except BadMedia as e:
            raise BadSample(f"{plan.object_key}.{mp.member}: {e}") from e
        g = mp.geometry
        if frames.shape[2] < g.crop_x0 + g.crop_w or frames.shape[1] < g.crop_y0 + g.crop_h:
            raise BadSample(f"{plan.object_key}.{mp.member}: decoded size {frames.shape[2]}x"
                            f"{frames.shape[1]} differs from the index")
        x = apply_geometry(frames, g)
        if self.cfg.augment and self.cfg.aug_color_jitter > 0:
            x = color_jitter(x, self.cfg.aug_color_jitter, rng_for(self.seed, plan.ref.epoch, plan.ref.uid, index, 1))
        return x

    def _annotation(self, plan: SamplePlan, meta: dict, members: dict[str, bytes]) -> list[int]:
        if not plan.media:
            raise BadSample(f"{plan.object_key}: annotations without media")
        g = plan.media[0].geometry
        try:
            boxes = transform_boxes(meta.get("boxes", []), g)
            points = transform_points(meta.get("points", []), g)
        except (TypeError, ValueError) as e:
            raise BadSample(f"{plan.object_key}.json: malformed boxes/points ({e})") from e
        return self.tok.encode(annotation_text(boxes, points, g.out_w, g.out_h))

    def row(self, plans: list[SamplePlan]) -> RowResult:
        s = self.cfg.seq_len
        tokens = np.full(s, self.tok.pad_id, dtype=np.int64)
        labels = np.full(s, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(s, dtype=np.int64)
        doc_ids = np.full(s, -1, dtype=np.int64)
        out = RowResult(tokens, labels, positions, doc_ids)
        offset, doc = 0, 0
        for plan in plans:
            length = plan.length
            try:
                ids, targets, media = self.sample(plan)
                if len(ids) != length:
                    raise BadSample(f"{plan.object_key}: {len(ids)} tokens, planned {length}")
            except BadSample as e:
                if self.cfg.bad_data == "fail":
                    raise BadSample(f"bad data (data.bad_data=fail): {e}") from e
                out.skipped.append((plan.object_key, str(e)))
                offset += length  # the hole stays padding: the rest of the row does not move
                continue
            tokens[offset:offset + length] = ids
            positions[offset:offset + length] = np.arange(length)
            doc_ids[offset:offset + length] = doc
            tgt = np.asarray(targets, dtype=bool)
            nxt = np.asarray(ids[1:], dtype=np.int64)
            # no loss on a placeholder position either (the contract: its output is an image slot)
            cur_is_text = np.asarray(ids[:-1], dtype=np.int64) != self.tok.media_id
            labels[offset:offset + length - 1] = np.where(tgt[1:] & cur_is_text, nxt, IGNORE_INDEX)
            for item, grid, at, patches in media:
                out.media.append((plan.ref.g * MAX_MEDIA_PER_SAMPLE + item, grid, offset + at, patches))
            offset += length
            doc += 1
        return out
