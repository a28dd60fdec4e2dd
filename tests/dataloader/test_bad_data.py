"""Bad data under both policies: skip (deterministic, counted, logged with the key) or fail
(an error naming the key). Cases found by the writer (flagged in the index) and cases that
appear only when reading (bytes changed after indexing, a missing object)."""
from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import pytest

from dataloader.dataset import DatasetError
from dataloader.loader import build_loader
from dataloader.sample_plan import BadSample
from dataloader.shard_format import ShardIndex, index_key
from dataloader.shard_writer import ShardWriter, write_manifest
from dataloader.template import TextTokenizer
from dataloader.worker_pool import WorkerError
from tests.dataloader.helpers import batch_rows, tiny_config


def _png(seed: int) -> bytes:
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 255, size=(40, 60, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _overwrite_member(root: str, shard: str, key: str, member: str, data_of_size) -> None:
    with open(os.path.join(root, index_key(shard)), "rb") as f:
        index = ShardIndex.from_bytes(f.read())
    entry = next(s for s in index.samples if s.key == key)
    offset, size = entry.members[member]
    with open(os.path.join(root, shard), "r+b") as f:
        f.seek(offset)
        f.write(data_of_size(size))


CASES = {
    # name: (members of the bad sample, what to break after indexing)
    "corrupt_image_in_index": ({"png": _png(1)[:200], "txt": b"a truncated picture"}, None),
    "corrupt_image_after_index": ({"png": _png(2), "txt": b"a picture"}, ("png", lambda n: b"\x00" * n)),
    "unknown_member_type": ({"xyz": b"???", "txt": b"text with a stray member"}, None),
    "malformed_json_in_index": ({"json": b"{not json", "png": _png(3)}, None),
    "malformed_json_after_index": ({"json": json.dumps({"segments": [{"media": "png"}, {"text": "ok"}]}).encode(),
                                    "png": _png(4)}, ("json", lambda n: b"{" * n)),
    "missing_object": ({"png": _png(5), "txt": b"in a shard that disappears"}, "delete-tar"),
    "missing_index": ({"png": _png(6), "txt": b"in a shard whose index disappears"}, "delete-index"),
}


def build_case(root: str, tokenizer_file: str, case: str) -> str:
    """Two shards of 4 samples; the bad sample is the second of shard 1. Returns its key."""
    tok = TextTokenizer(tokenizer_file)
    writer = ShardWriter(root, "src", tok, samples_per_shard=4)
    bad_members, breakage = CASES[case]
    for i in range(8):
        key = f"s{i}"
        if i == 5:
            writer.add("bad", dict(bad_members))
        else:
            writer.add(key, {"png": _png(100 + i), "txt": f"sample number {i} of the test".encode()})
    writer.close()
    write_manifest(root, {"src": writer}, tokenizer_file)
    shard = "src/shard-00001.tar"
    if breakage == "delete-tar":
        os.unlink(os.path.join(root, shard))
    elif breakage == "delete-index":
        os.unlink(os.path.join(root, index_key(shard)))
    elif breakage is not None:
        member, garbage = breakage
        _overwrite_member(root, shard, "bad", member, garbage)
    return "bad"


def run(root: str, steps: int, **overrides):
    cfg = tiny_config(root, seq_len=128, pack_buffer=4, shuffle_window=4, **overrides)
    loader = build_loader(cfg, seed=3, dp_rank=0, dp_size=1, rows_per_step=2)
    rows = []
    for _ in range(steps):
        batch = next(loader)
        batch.validate(loader.tokenizer_info[1])
        rows.append(batch_rows(batch))
    return loader, rows


@pytest.mark.parametrize("case", sorted(CASES))
def test_skip_policy_is_deterministic_counted_and_logged(case, demo_dir, tmp_path, caplog):
    root = str(tmp_path / case)
    key = build_case(root, os.path.join(demo_dir, "tokenizer.json"), case)
    with caplog.at_level(logging.WARNING):
        loader, rows = run(root, 6)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "bad data (skipped)" in logged
    if case in ("missing_object", "missing_index"):
        assert "src/shard-00001" in logged
    else:
        assert f"src/shard-00001.tar:{key}" in logged, logged
    counted = loader.samples_skipped + len(loader.skipped_keys) + len(loader.dataset.skipped_shards)
    assert counted >= 1
    again, rows_again = run(root, 6, workers=1)
    assert rows_again == rows, "skipping must give the same stream on every run and worker count"
    assert again.state_dict() == loader.state_dict()
    again.close()
    # resume in the middle continues the same stream, skips included
    first, _ = run(root, 3)
    resumed = build_loader(tiny_config(root, seq_len=128, pack_buffer=4, shuffle_window=4), seed=3,
                           dp_rank=0, dp_size=1, rows_per_step=2)
    resumed.load_state_dict(first.state_dict())
    assert [batch_rows(next(resumed)) for _ in range(3)] == rows[3:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fail_policy_names_the_key(case, demo_dir, tmp_path):
    root = str(tmp_path / case)
    key = build_case(root, os.path.join(demo_dir, "tokenizer.json"), case)
    workers = 1 if case == "corrupt_image_after_index" else 0  # a worker's failure reaches the caller too
    expected = (DatasetError if case == "missing_index" else WorkerError if workers else BadSample)
    with pytest.raises(expected) as info:
        run(root, 8, bad_data="fail", workers=workers)
    message = str(info.value)
    assert "src/shard-00001" in message
    if case not in ("missing_object", "missing_index"):
        assert f":{key}" in message


@pytest.mark.parametrize("case", ["malformed_json_after_index", "corrupt_image_after_index"])
def test_skip_keeps_the_planned_layout(case, demo_dir, tmp_path):
    """Other ranks planned the row from the index (DEP), so a sample found bad while reading
    keeps its place: its document span, positions and media placeholders stay; none of its
    tokens has a loss (unreadable text) or its image becomes uniform grey (undecodable)."""
    from dataloader.batch import IGNORE_INDEX
    from dataloader.materialize import BLANK_PIXEL

    root = str(tmp_path / case)
    key = build_case(root, os.path.join(demo_dir, "tokenizer.json"), case)
    cfg = tiny_config(root, seq_len=128, pack_buffer=4, shuffle_window=4)
    loader = build_loader(cfg, seed=3, dp_rank=0, dp_size=1, rows_per_step=2)
    media_id = loader.tokenizer_info[1]
    found = False
    for _ in range(6):
        batch = next(loader)
        batch.validate(media_id)
        for row, samples in enumerate(loader.last_step_samples):
            for doc, (_, sample_key) in enumerate(samples):
                if sample_key != key:
                    continue
                found = True
                span = (batch.doc_ids[row] == doc).nonzero().flatten()
                assert len(span) > 0, "the bad sample keeps its document span"
                a, b = int(span[0]), int(span[-1]) + 1
                assert batch.position_ids[row, a:b].tolist() == list(range(b - a))
                items = [m for m in batch.media if m.row == row and a <= m.offset < b]
                assert items, "its media items stay (their placeholders too: validate passed)"
                if case == "malformed_json_after_index":
                    assert bool((batch.labels[row, a:b] == IGNORE_INDEX).all()), "no loss on it"
                else:
                    assert all(bool((m.patches == BLANK_PIXEL).all()) for m in items)
                    assert bool((batch.labels[row, a:b] != IGNORE_INDEX).any()), "its text still trains"
    assert found, "the bad sample should be in the first steps"
