"""The on-store layout of a dataset: tar shards, one small index per shard, one manifest.

    DATASET/
      dataset.json                 manifest: sources, their shards, tokenizer file + sha
      tokenizer.json               the Hugging Face `tokenizers` file the counts were made with
      <source>/shard-00000.tar     WebDataset-compatible: <key>.jpg, <key>.json, <key>.txt, <key>.0.mp4 ...
      <source>/shard-00000.idx.json

Why an index: packing, the DEP plan and the global order need, per sample, its token
count and media sizes, and a single sample must be fetchable with one range request.
The index answers all of that without touching pixels:

    {"shard": "<source>/shard-00000.tar", "bytes": 123456, "samples": [
       {"key": "abc", "members": {"jpg": [offset, size], "json": [offset, size]},
        "segments": [{"media": "jpg", "kind": "image", "w": 512, "h": 384, "f": 1},
                     {"text": "txt", "tokens": 17, "loss": true}],
        "ann_tokens": 0, "bad": ""}]}

A text segment's "text" names where its characters live: "txt" (a member) or an
integer (the position of that segment in the sample's JSON member). "bad" is a non-empty
reason when the writer found the sample unusable (unknown member type, malformed JSON,
undecodable media); the loader's bad-data policy decides what happens to it.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field

MANIFEST = "dataset.json"
FORMAT_VERSION = "k25-shards-v1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi")
TEXT_EXTS = ("txt",)
META_EXTS = ("json",)
KNOWN_EXTS = IMAGE_EXTS + VIDEO_EXTS + TEXT_EXTS + META_EXTS

# Special tokens at fixed ids, shared with the model config (media_token_id = 1).
PAD, MEDIA, BOS, EOS = "<pad>", "<media>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, MEDIA, BOS, EOS)


def member_kind(member: str) -> str:
    """'image' | 'video' | 'text' | 'meta' | 'unknown' from the last extension of a member name."""
    ext = member.rsplit(".", 1)[-1].lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    if ext in TEXT_EXTS:
        return "text"
    if ext in META_EXTS:
        return "meta"
    return "unknown"


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset naming: the key is everything before the first dot of the basename."""
    slash = name.rfind("/")
    base = name[slash + 1:]
    dot = base.find(".")
    if dot <= 0:
        raise ValueError(f"tar member {name!r} has no '<key>.<ext>' form")
    return name[:slash + 1] + base[:dot], base[dot + 1:]


@dataclass
class SampleIndex:
    key: str
    members: dict[str, tuple[int, int]]  # member name -> (byte offset in the tar, size)
    segments: list[dict]
    ann_tokens: int = 0
    bad: str = ""

    def to_json(self) -> dict:
        return {"key": self.key, "members": {k: list(v) for k, v in self.members.items()},
                "segments": self.segments, "ann_tokens": self.ann_tokens, "bad": self.bad}

    @staticmethod
    def from_json(d: dict) -> "SampleIndex":
        return SampleIndex(d["key"], {k: (int(v[0]), int(v[1])) for k, v in d["members"].items()},
                           list(d["segments"]), int(d.get("ann_tokens", 0)), d.get("bad", ""))

    def byte_span(self) -> tuple[int, int]:
        """[start, end) covering every member, for one range request per sample."""
        starts = [o for o, _ in self.members.values()]
        ends = [o + s for o, s in self.members.values()]
        return (min(starts), max(ends)) if starts else (0, 0)


@dataclass
class ShardIndex:
    shard: str  # object key of the tar, relative to the dataset root
    num_bytes: int
    samples: list[SampleIndex] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return json.dumps({"shard": self.shard, "bytes": self.num_bytes,
                           "samples": [s.to_json() for s in self.samples]},
                          separators=(",", ":")).encode()

    @staticmethod
    def from_bytes(data: bytes, name: str = "?") -> "ShardIndex":
        try:
            d = json.loads(data)
            return ShardIndex(d["shard"], int(d["bytes"]),
                              [SampleIndex.from_json(s) for s in d["samples"]])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"shard index {name} is malformed ({e}); rebuild it with "
                             "dataloader.shard_writer") from e


def index_key(shard_key: str) -> str:
    if not shard_key.endswith(".tar"):
        raise ValueError(f"shard {shard_key!r} must end in .tar")
    return shard_key[:-4] + ".idx.json"


def tar_member_spans(tar_bytes: bytes) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) for every regular file in a tar."""
    spans = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                spans[info.name] = (info.offset_data, info.size)
    return spans


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
