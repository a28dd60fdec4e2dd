"""Packing: every sample of an epoch exactly once, correct boundaries, high efficiency."""
from __future__ import annotations

from collections import Counter

import torch

from dataloader.batch import IGNORE_INDEX
from dataloader.loader import build_loader
from tests.dataloader.helpers import tiny_config


def test_epoch_has_every_sample_once_and_rows_follow_the_contract(demo_dir):
    cfg = tiny_config(demo_dir, blend="captions:1", seq_len=256)
    loader = build_loader(cfg, seed=2, dp_rank=0, dp_size=1, rows_per_step=2)
    n = loader.dataset.sources[loader.dataset.source_names.index("captions")].num_samples
    _, media_id, pad_id = loader.tokenizer_info
    seen = Counter()
    lane_max_k = [0, 0]  # row r of every step comes from lane r
    extra = None
    # once a lane has drawn past the epoch, the oldest buffered sample opens every row, so
    # none of the epoch waits longer than pack_buffer more rows
    while extra is None or extra > 0:
        batch = next(loader)
        batch.validate(media_id)
        ids = [m.item_id for m in batch.media]
        assert len(set(ids)) == len(ids), "media item ids must be unique within a step"
        for row, samples in enumerate(loader.last_step_samples):
            docs = batch.doc_ids[row]
            planned = [p for p in samples]
            present = [d for d in docs.unique().tolist() if d >= 0]
            assert present == list(range(len(planned))), "one document per packed sample, numbered 0.."
            for d in present:
                idx = (docs == d).nonzero().flatten()
                a, b = int(idx[0]), int(idx[-1]) + 1
                assert b - a == len(idx), "a document occupies one contiguous span"
                assert torch.equal(batch.position_ids[row, a:b], torch.arange(b - a)), "positions restart"
                assert batch.labels[row, b - 1] == IGNORE_INDEX, "no label crosses a document boundary"
                assert batch.tokens[row, a] == loader.tokenizer.bos_id
                lab = batch.labels[row, a:b - 1]
                nxt = batch.tokens[row, a + 1:b]
                ok = lab == IGNORE_INDEX
                assert bool((ok | (lab == nxt)).all()), "labels are the next token or ignored"
            pad = docs == -1
            assert bool((batch.labels[row][pad] == IGNORE_INDEX).all())
            assert bool((batch.tokens[row][pad] == pad_id).all())
            for ref, key in samples:
                seen[(ref.k // n, ref.shard, ref.local)] += 1
                lane_max_k[row] = max(lane_max_k[row], ref.k)
        if extra is not None:
            extra -= 1
        elif min(lane_max_k) >= n:
            extra = cfg.pack_buffer
    first_epoch = {k: c for k, c in seen.items() if k[0] == 0}
    assert len(first_epoch) == n, f"{n - len(first_epoch)} samples of epoch 0 never packed"
    assert all(c == 1 for c in first_epoch.values()), "a sample was packed twice"


def test_packing_efficiency_on_the_demo_data(demo_dir):
    loader = build_loader(tiny_config(demo_dir, seq_len=512, pack_buffer=32, max_media_per_row=16),
                          seed=0, dp_rank=0, dp_size=1, rows_per_step=4)
    pads = total = 0
    for _ in range(8):
        batch = next(loader)
        pads += int((batch.doc_ids == -1).sum())
        total += batch.doc_ids.numel()
    assert 1 - pads / total > 0.9
    assert abs(loader.packing_efficiency - (1 - pads / total)) < 1e-9


def test_media_cap_per_row(demo_dir):
    loader = build_loader(tiny_config(demo_dir, blend="captions:1", seq_len=512, max_media_per_row=3),
                          seed=0, dp_rank=0, dp_size=1, rows_per_step=4)
    for _ in range(5):
        batch = next(loader)
        per_row = Counter(m.row for m in batch.media)
        assert max(per_row.values()) <= 3
