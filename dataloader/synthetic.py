"""A small deterministic batch generator in the batch contract, for tests and the CPU demo.

It produces learnable data so a falling loss means something:
  - text documents are arithmetic progressions of token ids (the model must
    infer the stride from the first tokens);
  - image/video documents are media items whose pixels carry a class (a
    per-class colour pattern plus noise) followed by a caption that starts at
    that class: predicting the caption needs the vision path.

The global batch of a step is a pure function of (seed, step); data-parallel
ranks take row slices of it, so every layout sees the same data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dataloader.batch import IGNORE_INDEX, Batch, MediaItem, merged_tokens

FIRST_TEXT_TOKEN = 4  # ids 0..3 are reserved: pad, media placeholder, bos, eos
PAD_ID = 0


@dataclass
class SyntheticConfig:
    seq_len: int
    vocab_size: int
    media_token_id: int
    patch_dim: int
    media_per_seq: int = 1
    max_side: int = 8  # largest image side, in patches (even)
    max_frames: int = 4
    num_classes: int = 8
    # edge cases: row 0 holds one image with more patches than the rest of the batch, every
    # 4th row (from row 3) is text only, every 4th row from row 2 holds media documents only
    edge_cases: bool = False


class SyntheticBatches:
    def __init__(self, cfg: SyntheticConfig, seed: int):
        if cfg.media_token_id >= FIRST_TEXT_TOKEN or cfg.vocab_size <= FIRST_TEXT_TOKEN + 16:
            raise ValueError("synthetic data needs media_token_id < 4 and a vocabulary above 20 ids")
        self.cfg, self.seed = cfg, seed
        gen = torch.Generator().manual_seed(seed * 7919 + 17)
        # one fixed colour pattern per class, shared by every image of that class
        self.class_patterns = torch.randn(cfg.num_classes, cfg.patch_dim, generator=gen)

    def global_batch(self, step: int, rows: int) -> Batch:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        S = cfg.seq_len
        tokens = torch.full((rows, S), PAD_ID, dtype=torch.long)
        labels = torch.full((rows, S), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((rows, S), dtype=torch.long)
        doc_ids = torch.full((rows, S), -1, dtype=torch.long)
        media: list[MediaItem] = []
        for row in range(rows):
            kind = self._row_kind(row)
            cursor, doc = 0, 0
            media_left = {"text": 0, "media_only": S, "huge": 1}.get(kind, cfg.media_per_seq)
            while cursor < S - 4:
                if media_left > 0:
                    media_left -= 1
                    item = (self._huge_item(len(media), row) if kind == "huge"
                            else self._media_item(gen, len(media), row))
                    doc_tokens, doc_labels = self._media_document(gen, item, S - cursor)
                    if doc_tokens is None:
                        if kind == "media_only":
                            break  # the rest of the row stays padding
                        continue
                    item.offset = cursor + 1  # after the bos token
                    media.append(item)
                elif kind == "media_only":
                    break
                else:
                    doc_tokens, doc_labels = self._text_document(gen, S - cursor)
                n = len(doc_tokens)
                tokens[row, cursor:cursor + n] = torch.tensor(doc_tokens)
                labels[row, cursor:cursor + n] = torch.tensor(doc_labels)
                positions[row, cursor:cursor + n] = torch.arange(n)
                doc_ids[row, cursor:cursor + n] = doc
                cursor, doc = cursor + n, doc + 1
        return Batch(tokens, labels, positions, doc_ids, media)

    def _row_kind(self, row: int) -> str:
        if not self.cfg.edge_cases:
            return "normal"
        if row == 0:
            return "huge"
        return {3: "text", 2: "media_only"}.get(row % 4, "normal")

    def _huge_item(self, item_id: int, row: int) -> MediaItem:
        """The largest image whose caption document still fits in one sequence."""
        half = int((self.cfg.seq_len - 10) ** 0.5)
        return MediaItem(item_id=item_id, grid_thw=(1, 2 * half, 2 * half), row=row, offset=-1)

    def _text_document(self, gen, room: int) -> tuple[list[int], list[int]]:
        cfg = self.cfg
        span = cfg.vocab_size - FIRST_TEXT_TOKEN
        length = min(room, int(torch.randint(8, 48, (1,), generator=gen)))
        start = int(torch.randint(0, span, (1,), generator=gen))
        stride = int(torch.randint(1, 6, (1,), generator=gen))
        body = [FIRST_TEXT_TOKEN + (start + i * stride) % span for i in range(length)]
        return body, body[1:] + [IGNORE_INDEX]

    def _media_item(self, gen, item_id: int, row: int) -> MediaItem:
        cfg = self.cfg
        # skewed sizes: mostly small images, sometimes a large one, sometimes a video chunk
        large = float(torch.rand(1, generator=gen)) < 0.2
        side_max = cfg.max_side if large else max(2, cfg.max_side // 2)
        h = 2 * int(torch.randint(1, side_max // 2 + 1, (1,), generator=gen))
        w = 2 * int(torch.randint(1, side_max // 2 + 1, (1,), generator=gen))
        t = cfg.max_frames if float(torch.rand(1, generator=gen)) < 0.25 else 1
        return MediaItem(item_id=item_id, grid_thw=(t, h, w), row=row, offset=-1)

    def _media_document(self, gen, item: MediaItem, room: int):
        """<bos> <media> x n <sep> caption... : loss only on the caption (predicted from <sep> on)."""
        cfg = self.cfg
        n_media = merged_tokens(item.grid_thw)
        caption_len = int(torch.randint(3, 9, (1,), generator=gen))
        if 2 + n_media + caption_len > room:
            return None, None
        cls = int(torch.randint(0, cfg.num_classes, (1,), generator=gen))
        noise = torch.randn(item.num_patches, cfg.patch_dim, generator=gen) * 0.5
        item.patches = self.class_patterns[cls] + noise
        span = cfg.vocab_size - FIRST_TEXT_TOKEN
        caption = [FIRST_TEXT_TOKEN + (cls * 37 + i) % span for i in range(caption_len)]
        media = cfg.media_token_id
        doc = [2] + [media] * n_media + [3] + caption
        labels = [doc[i + 1] if i + 1 < len(doc) and media not in (doc[i], doc[i + 1])
                  else IGNORE_INDEX for i in range(len(doc))]
        return doc, labels
