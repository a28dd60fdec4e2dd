"""Tokenization and the sample template: text segments, media placeholders, loss mask.

One sample becomes one document of a packed row:

    <bos> [seg 0] [seg 1] ... [annotation text] <eos>
           text -> its tokens (loss on or off per segment: prompts are masked)
           media -> merged_tokens(grid) copies of <media> per image / video chunk (no loss)

`targets[i]` says whether token i is something the model must predict; the packer turns
that into shifted labels (label at s = token s+1 when targets[s+1]). <bos> and
placeholders are never targets; <eos> is, so the model learns to end a document.

Annotation text carries boxes and points in coordinates normalised to 0..999 and
written with a fixed width of three digits. With digits split one per token (the demo
tokenizer's pre-tokenizer does that) the count of annotation tokens does not depend on
the values, so it is known from the index before augmentation moves the coordinates.
The loader checks that promise on every sample it materialises.
"""
from __future__ import annotations

from dataclasses import dataclass

from dataloader.shard_format import BOS, EOS, MEDIA, PAD, SPECIAL_TOKENS

IGNORE_INDEX = -100  # the label of a position without loss


def merged_tokens(grid_thw: tuple[int, int, int]) -> int:
    """LM tokens (placeholders) one media item becomes: frames pool to one, 2x2 patches merge to one."""
    _, h, w = grid_thw
    return (h // 2) * (w // 2)


def _coord(value: float, extent: float) -> str:
    return f"{min(999, max(0, int(value / extent * 1000))):03d}"


def annotation_text(boxes: list, points: list, width: float, height: float) -> str:
    """Grounding text for boxes [x0, y0, x1, y1, label] and points [x, y, label] (pixels)."""
    parts = []
    for x0, y0, x1, y1, label in boxes:
        parts.append(f" <ref>{label}</ref><box>({_coord(x0, width)},{_coord(y0, height)}),"
                     f"({_coord(x1, width)},{_coord(y1, height)})</box>")
    for x, y, label in points:
        parts.append(f" <ref>{label}</ref><point>({_coord(x, width)},{_coord(y, height)})</point>")
    return "".join(parts)


class TextTokenizer:
    """A Hugging Face `tokenizers` file with the four special tokens this format needs."""

    def __init__(self, path: str | None = None, *, data: bytes | None = None):
        from tokenizers import Tokenizer

        if data is not None:
            self._tok = Tokenizer.from_str(data.decode())
        elif path is not None:
            self._tok = Tokenizer.from_file(path)
        else:
            raise ValueError("TextTokenizer needs a path or the file's bytes")
        ids = {}
        for name in SPECIAL_TOKENS:
            token_id = self._tok.token_to_id(name)
            if token_id is None:
                raise ValueError(f"tokenizer {path or '<bytes>'} has no {name} token; train it with "
                                 f"special tokens {list(SPECIAL_TOKENS)}")
            ids[name] = token_id
        self.pad_id, self.media_id = ids[PAD], ids[MEDIA]
        self.bos_id, self.eos_id = ids[BOS], ids[EOS]
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """One call for many texts (a row's): the same ids as `encode` on each, without
        a Python round trip per text."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


@dataclass
class Piece:
    """A run of tokens inside one document, as the plan knows it before decoding."""

    kind: str  # "bos" | "text" | "media" | "ann" | "eos"
    length: int
    loss: bool
    source: object = None  # text: "txt" or JSON segment position; media: (member, chunk index)


def layout_length(pieces: list[Piece]) -> int:
    return sum(p.length for p in pieces)


def truncate_layout(pieces: list[Piece], limit: int) -> list[Piece]:
    """Cut a document to `limit` tokens. Text may be cut anywhere; a media span is kept
    whole or dropped with everything after it (a half image has no meaning)."""
    out, used = [], 0
    for p in pieces:
        room = limit - used
        if room <= 0:
            break
        if p.length <= room:
            out.append(p)
            used += p.length
        elif p.kind in ("text", "ann"):
            out.append(Piece(p.kind, room, p.loss, p.source))
            used += room
            break
        else:
            break
    return out
