"""Builds tar shards, their indexes and the dataset manifest (see shard_format.py).

Input is a stream of samples, each a key and its members (WebDataset naming: member
"jpg" of key "abc" is stored as "abc.jpg"). A sample's meaning comes from its JSON member
when it has one:

    {"segments": [{"text": "Describe the image.", "loss": false}, {"media": "jpg"},
                  {"text": "A cat on a mat.", "loss": true}],
     "boxes": [[x0, y0, x1, y1, "cat"]], "points": [[x, y, "nose"]]}   # pixels of the first media

and otherwise from its members: every image/video (in member-name order), then the
"txt" member as the caption (with loss). The writer decodes every media member once, to
record its size and catch corrupt files early; a sample it cannot use is still indexed,
with the reason in "bad", so the loader's bad-data policy (not the writer) decides.

    python -m dataloader.shard_writer --input FOLDER_OR_MANIFEST.jsonl --out DATASET \
        --source NAME --tokenizer tokenizer.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from collections import defaultdict
from typing import Iterable, Iterator

from dataloader.media_decode import BadMedia, probe_image, probe_video
from dataloader.shard_format import (
    FORMAT_VERSION, MANIFEST, SampleIndex, ShardIndex, index_key, member_kind, sha256_hex,
    split_member_name, tar_member_spans)
from dataloader.store import atomic_write
from dataloader.template import TextTokenizer, annotation_text


def describe_sample(key: str, members: dict[str, bytes], tok: TextTokenizer) -> tuple[list[dict], int, str]:
    """(segments, annotation token count, bad reason) of one sample, from its bytes."""
    unknown = sorted(m for m in members if member_kind(m) == "unknown")
    if unknown:
        return [], 0, f"unknown member type {unknown[0]!r}"
    boxes, points = [], []
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            raw_segments = meta["segments"]
            boxes, points = meta.get("boxes", []), meta.get("points", [])
            if not isinstance(raw_segments, list):
                raise TypeError("'segments' must be a list")
        except (ValueError, KeyError, TypeError) as e:
            return [], 0, f"malformed JSON member: {e}"
        spec = []
        for i, seg in enumerate(raw_segments):
            if "text" in seg:
                spec.append(("text", i, seg["text"], bool(seg.get("loss", True))))
            elif "media" in seg:
                spec.append(("media", seg["media"], None, False))
            else:
                return [], 0, f"malformed JSON member: segment {i} has neither 'text' nor 'media'"
    else:
        media = sorted(m for m in members if member_kind(m) in ("image", "video"))
        spec = [("media", m, None, False) for m in media]
        if "txt" in members:
            spec.append(("text", "txt", members["txt"].decode("utf-8", "replace"), True))
    segments: list[dict] = []
    first_media = None
    for kind, where, text, loss in spec:
        if kind == "text":
            segments.append({"text": where, "tokens": len(tok.encode(text)), "loss": loss})
            continue
        if where not in members:
            return [], 0, f"JSON names media member {where!r} that the sample does not have"
        mkind = member_kind(where)
        try:
            if mkind == "image":
                w, h = probe_image(members[where])
                f = 1
            elif mkind == "video":
                w, h, f = probe_video(members[where])
            else:
                return [], 0, f"segment media {where!r} is not an image or video"
        except BadMedia as e:
            return [], 0, f"{where}: {e}"
        seg = {"media": where, "kind": mkind, "w": w, "h": h, "f": f}
        if first_media is None:
            first_media = seg
        segments.append(seg)
    if not segments:
        return [], 0, "sample has no text and no media"
    ann_tokens = 0
    if boxes or points:
        if first_media is None:
            return [], 0, "boxes/points given but the sample has no media"
        try:
            xs = [b[0] for b in boxes] + [b[2] for b in boxes] + [p[0] for p in points]
            ys = [b[1] for b in boxes] + [b[3] for b in boxes] + [p[1] for p in points]
            first_media["keep"] = [min(xs), min(ys), max(xs), max(ys)]
            ann_tokens = len(tok.encode(annotation_text(boxes, points, first_media["w"], first_media["h"])))
        except (TypeError, ValueError, IndexError) as e:
            return [], 0, f"malformed JSON member: bad boxes/points ({e})"
    return segments, ann_tokens, ""


class ShardWriter:
    """Writes one source's samples into shards of at most `samples_per_shard` samples or
    about `shard_bytes` bytes; `close()` returns the shard keys written."""

    def __init__(self, out_dir: str, source: str, tokenizer: TextTokenizer, *,
                 samples_per_shard: int = 64, shard_bytes: int = 64 << 20):
        self.out_dir, self.source, self.tok = out_dir, source, tokenizer
        self.samples_per_shard, self.shard_bytes = samples_per_shard, shard_bytes
        self.shards: list[str] = []
        self.num_samples = 0
        self._pending: list[tuple[str, dict[str, bytes]]] = []
        self._pending_bytes = 0
        self._keys: set[str] = set()

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key.rsplit("/", 1)[-1] or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no dot")
        if key in self._keys:
            raise ValueError(f"sample key {key!r} appears twice in source {self.source!r}")
        self._keys.add(key)
        self._pending.append((key, members))
        self._pending_bytes += sum(len(v) for v in members.values())
        if len(self._pending) >= self.samples_per_shard or self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        shard_key = f"{self.source}/shard-{len(self.shards):05d}.tar"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in self._pending:
                for name in sorted(members):
                    info = tarfile.TarInfo(f"{key}.{name}")
                    info.size = len(members[name])
                    info.mode, info.mtime = 0o644, 0  # reproducible bytes
                    tar.addfile(info, io.BytesIO(members[name]))
        data = buf.getvalue()
        spans = tar_member_spans(data)
        index = ShardIndex(shard_key, len(data))
        for key, members in self._pending:
            segments, ann_tokens, bad = describe_sample(key, members, self.tok)
            index.samples.append(SampleIndex(
                key, {name: spans[f"{key}.{name}"] for name in sorted(members)},
                segments, ann_tokens, bad))
        atomic_write(os.path.join(self.out_dir, shard_key), data)
        atomic_write(os.path.join(self.out_dir, index_key(shard_key)), index.to_bytes())
        self.shards.append(shard_key)
        self.num_samples += len(self._pending)
        self._pending, self._pending_bytes = [], 0

    def close(self) -> list[str]:
        self._flush()
        return self.shards


def write_manifest(out_dir: str, sources: dict[str, ShardWriter], tokenizer_file: str) -> None:
    """dataset.json; the tokenizer is copied next to it so the dataset is self-contained."""
    with open(tokenizer_file, "rb") as f:
        tok_bytes = f.read()
    atomic_write(os.path.join(out_dir, "tokenizer.json"), tok_bytes)
    manifest = {
        "format": FORMAT_VERSION,
        "tokenizer": "tokenizer.json",
        "tokenizer_sha256": sha256_hex(tok_bytes),
        "sources": {name: {"shards": w.shards, "num_samples": w.num_samples}
                    for name, w in sources.items()},
    }
    atomic_write(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1).encode())


def samples_from_folder(folder: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Groups files by WebDataset key (path without the extensions), in sorted order."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            key, ext = split_member_name(rel)
            groups[key.replace("/", "_")][ext] = os.path.join(root, name)
    for key in sorted(groups):
        yield key, {ext: open(path, "rb").read() for ext, path in groups[key].items()}


def samples_from_jsonl(manifest: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """One JSON object per line: {"key": K, "files": {"jpg": PATH}, "json": {...}, "txt": "..."}.
    Relative paths are relative to the manifest's folder."""
    base = os.path.dirname(os.path.abspath(manifest))
    with open(manifest) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = rec["key"]
            except (ValueError, KeyError) as e:
                raise ValueError(f"{manifest}:{line_no}: not a JSON object with a 'key' ({e})") from e
            members = {ext: open(os.path.join(base, p), "rb").read()
                       for ext, p in rec.get("files", {}).items()}
            if "json" in rec:
                members["json"] = json.dumps(rec["json"]).encode()
            if "txt" in rec:
                members["txt"] = rec["txt"].encode()
            yield key, members


def write_source(out_dir: str, source: str, samples: Iterable[tuple[str, dict[str, bytes]]],
                 tokenizer: TextTokenizer, samples_per_shard: int = 64) -> ShardWriter:
    writer = ShardWriter(out_dir, source, tokenizer, samples_per_shard=samples_per_shard)
    for key, members in samples:
        writer.add(key, members)
    writer.close()
    return writer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="a folder of <key>.<ext> files or a .jsonl manifest")
    p.add_argument("--out", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizers JSON file")
    p.add_argument("--samples-per-shard", type=int, default=64)
    a = p.parse_args(argv)
    tok = TextTokenizer(a.tokenizer)
    samples = samples_from_jsonl(a.input) if a.input.endswith(".jsonl") else samples_from_folder(a.input)
    writer = write_source(a.out, a.source, samples, tok, a.samples_per_shard)
    write_manifest(a.out, {a.source: writer}, a.tokenizer)
    print(f"wrote {writer.num_samples} samples in {len(writer.shards)} shards to {a.out}")


if __name__ == "__main__":
    main()
