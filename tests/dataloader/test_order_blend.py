"""Global order (pure function, per-epoch permutation, bounded window) and blend schedules."""
from __future__ import annotations

import math

import pytest

from dataloader.blend import BlendSchedule
from dataloader.order import SourceOrder


def test_each_epoch_is_a_permutation_not_the_identity_and_epochs_differ():
    sizes = [7, 9, 8, 6, 10]
    order = SourceOrder(sizes, seed=3, source_id=0, shuffle=True, window=12)
    n = sum(sizes)
    epochs = [[order.locate(e * n + p)[1:] for p in range(n)] for e in range(2)]
    everything = sorted((s, i) for s, size in enumerate(sizes) for i in range(size))
    for e, seq in enumerate(epochs):
        assert sorted(seq) == everything, f"epoch {e} loses or repeats samples"
    shard_major = [(s, i) for s, size in enumerate(sizes) for i in range(size)]
    assert epochs[0] != shard_major and epochs[1] != shard_major
    assert epochs[0] != epochs[1]
    again = SourceOrder(sizes, seed=3, source_id=0, shuffle=True, window=12)
    assert [again.locate(k)[1:] for k in range(n)] == epochs[0], "order must be a pure function"
    assert [order.locate(k)[1:] for k in reversed(range(n))] == list(reversed(epochs[0])), \
        "random access must give the same answer as sequential access"
    unshuffled = SourceOrder(sizes, seed=3, source_id=0, shuffle=False, window=12)
    assert [unshuffled.locate(k)[1:] for k in range(n)] == shard_major


def test_reads_stay_within_a_bounded_window_of_shards():
    sizes = [10] * 30
    window = 20
    order = SourceOrder(sizes, seed=1, source_id=2, shuffle=True, window=window)
    shard_order = order._epoch_table(0)[0]
    rank = {s: r for r, s in enumerate(shard_order)}
    for w in range(len(sizes) * 10 // window):
        shards = {order.locate(w * window + r)[1] for r in range(window)}
        spread = max(rank[s] for s in shards) - min(rank[s] for s in shards)
        assert spread <= math.ceil(window / 10), "a window must only touch neighbouring shards"


def test_blend_ratios_per_phase_match_weights_within_sampling_error():
    names = ["a", "b", "c"]
    sched = BlendSchedule.parse("0:a:0.6,b:0.3,c:0.1;3000:a:0.1,b:0.2,c:0.7", names, [10, 10, 10])
    for start, stop, weights in ((0, 3000, [0.6, 0.3, 0.1]), (3000, 9000, [0.1, 0.2, 0.7])):
        n = stop - start
        counts = [0, 0, 0]
        for g in range(start, stop):
            counts[sched.source_of(11, g)] += 1
        for c, w in zip(counts, weights):
            sigma = math.sqrt(n * w * (1 - w))
            assert abs(c - n * w) < 4 * sigma, f"phase at {start}: {counts} vs weights {weights}"
    first = [sched.source_of(11, g) for g in range(500)]
    assert first == [sched.source_of(11, g) for g in range(500)], "blend must be deterministic"
    assert first != [sched.source_of(12, g) for g in range(500)], "the seed must matter"


def test_blend_default_is_by_size_and_bad_specs_are_refused():
    sched = BlendSchedule.parse("", ["a", "b"], [30, 10])
    assert sched.weights == [[0.75, 0.25]]
    with pytest.raises(ValueError, match="source among"):
        BlendSchedule.parse("x:1", ["a", "b"], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        BlendSchedule.parse("a:0,b:0", ["a", "b"], [1, 1])
    with pytest.raises(ValueError, match="start at 0"):
        BlendSchedule.parse("5:a:1;2:b:1", ["a", "b"], [1, 1])


def test_loader_follows_a_blend_schedule(demo_dir):
    """Through the whole loader: the sources of the samples follow the phase weights."""
    from dataloader.loader import build_loader
    from tests.dataloader.helpers import tiny_config

    cfg = tiny_config(demo_dir, blend="0:text:1;40:captions:1", augment=False, pack_buffer=1)
    loader = build_loader(cfg, seed=5, dp_rank=0, dp_size=1, rows_per_step=4)
    names = loader.dataset.source_names
    seen = []
    while len(seen) < 60:
        next(loader)
        seen.extend(ref for row in loader.last_step_samples for ref, _ in row)
    for ref in seen[:60]:
        assert names[ref.source] == ("text" if ref.g < 40 else "captions")
