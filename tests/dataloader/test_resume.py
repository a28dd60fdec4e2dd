"""Resume determinism: a restored loader continues the exact stream of an uninterrupted one,
whatever the interruption point, the number of workers or the DP size."""
from __future__ import annotations

import copy

import pytest

from dataloader.loader import LoaderStateError, build_loader, merge_states
from tests.dataloader.helpers import assert_same_rows, batch_rows, take_rows, tiny_config

ROWS = 2


def reference(demo_dir: str, extra_steps: int = 3):
    """Rows, per-step states and the step that finishes the first pass over the data."""
    loader = build_loader(tiny_config(demo_dir), seed=7, dp_rank=0, dp_size=1, rows_per_step=ROWS)
    total = sum(s.num_samples for s in loader.dataset.sources)
    rows, states, epoch_end = [], [], None
    while epoch_end is None or len(states) < epoch_end + 1 + extra_steps:
        rows.append(batch_rows(next(loader)))
        states.append(loader.state_dict())
        drawn = sum(lane["stream"]["drawn"] for lane in states[-1]["lanes"].values())
        if epoch_end is None and drawn >= total:
            epoch_end = len(states) - 1
    return rows, states, epoch_end


@pytest.fixture(scope="module")
def ref(demo_dir):
    return reference(demo_dir)


def _flat(rows_per_step):
    return [r for step in rows_per_step for r in step]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_identical_stream(demo_dir, ref, workers):
    rows, _, epoch_end = ref
    total_steps = len(rows)
    assert epoch_end > 4, "the tiny dataset should take several steps per pass"
    for point in (0, 1, epoch_end // 2, epoch_end):
        cfg = tiny_config(demo_dir, workers=workers)
        original = build_loader(cfg, seed=7, dp_rank=0, dp_size=1, rows_per_step=ROWS)
        assert_same_rows(take_rows(original, point), _flat(rows[:point]))
        state = copy.deepcopy(original.state_dict())
        assert_same_rows(take_rows(original, total_steps - point), _flat(rows[point:]))
        original.close()
        restored = build_loader(cfg, seed=7, dp_rank=0, dp_size=1, rows_per_step=ROWS)
        restored.load_state_dict(state)
        assert_same_rows(take_rows(restored, total_steps - point), _flat(rows[point:]))
        restored.close()


def test_resume_with_other_worker_count(demo_dir, ref):
    rows, _, epoch_end = ref
    point = epoch_end // 2
    for before, after in ((0, 2), (2, 1)):
        a = build_loader(tiny_config(demo_dir, workers=before), seed=7, dp_rank=0, dp_size=1, rows_per_step=ROWS)
        take_rows(a, point)
        state = a.state_dict()
        a.close()
        b = build_loader(tiny_config(demo_dir, workers=after, prefetch=3), seed=7, dp_rank=0, dp_size=1,
                         rows_per_step=ROWS)
        b.load_state_dict(state)
        assert_same_rows(take_rows(b, len(rows) - point), _flat(rows[point:]))
        b.close()


def test_resume_with_other_dp_size(demo_dir, ref):
    """2 ranks x 1 row, then 1 rank x 2 rows and 2 ranks again: the global rows continue."""
    rows, _, epoch_end = ref
    global_rows = _flat(rows)
    point = epoch_end // 2
    ranks = [build_loader(tiny_config(demo_dir), seed=7, dp_rank=r, dp_size=2, rows_per_step=1) for r in range(2)]
    got = []
    for _ in range(point):
        for loader in ranks:
            got.extend(batch_rows(next(loader)))
    states = [loader.state_dict() for loader in ranks]
    assert [sorted(s["lanes"]) for s in states] == [["0"], ["1"]], "each rank holds its own lane"
    with pytest.raises(LoaderStateError, match="lacks lanes"):
        build_loader(tiny_config(demo_dir), seed=7, dp_rank=0, dp_size=1, rows_per_step=2).load_state_dict(
            states[0])
    single = build_loader(tiny_config(demo_dir), seed=7, dp_rank=0, dp_size=1, rows_per_step=2)
    single.load_state_dict(merge_states(states))
    got.extend(take_rows(single, 3))
    again = [build_loader(tiny_config(demo_dir), seed=7, dp_rank=r, dp_size=2, rows_per_step=1) for r in range(2)]
    for loader in again:
        loader.load_state_dict(single.state_dict())
    for _ in range(4):
        for loader in again:
            got.extend(batch_rows(next(loader)))
    assert_same_rows(got, global_rows[:len(got)])
    assert len(got) == 2 * point + 6 + 8


def test_state_refused_after_start_and_from_other_config(demo_dir, tmp_path):
    loader = build_loader(tiny_config(demo_dir), seed=7, dp_rank=0, dp_size=1, rows_per_step=ROWS)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(LoaderStateError, match="after iteration started"):
        loader.load_state_dict(state)
    other_cfg = build_loader(tiny_config(demo_dir, seq_len=256), seed=7, dp_rank=0, dp_size=1, rows_per_step=ROWS)
    with pytest.raises(LoaderStateError, match="other stream settings"):
        other_cfg.load_state_dict(state)
    other_seed = build_loader(tiny_config(demo_dir), seed=8, dp_rank=0, dp_size=1, rows_per_step=ROWS)
    with pytest.raises(LoaderStateError, match="seed"):
        other_seed.load_state_dict(state)
    other_batch = build_loader(tiny_config(demo_dir), seed=7, dp_rank=0, dp_size=1, rows_per_step=ROWS + 1)
    with pytest.raises(LoaderStateError, match="keep the global batch"):
        other_batch.load_state_dict(state)
    from launch.make_dataset import build

    other_data = str(tmp_path / "other")
    build(other_data, num_digits=10, num_text_docs=4, video_photos=("coffee",), samples_per_shard=8)
    other = build_loader(tiny_config(other_data), seed=7, dp_rank=0, dp_size=1, rows_per_step=ROWS)
    with pytest.raises(LoaderStateError, match="another dataset"):
        other.load_state_dict(state)
    # execution-only settings may change
    ok = build_loader(tiny_config(demo_dir, workers=1, prefetch=1, memory_cache_mb=1), seed=7, dp_rank=0,
                      dp_size=1, rows_per_step=ROWS)
    ok.load_state_dict(state)
    ok.close()


def test_state_is_small_and_resume_is_not_a_replay(demo_dir, ref):
    """O(1) resume: the state holds positions and the packing buffers, not the history."""
    _, states, epoch_end = ref
    early, late = states[1], states[epoch_end]
    for lane in ("0", "1"):
        assert len(late["lanes"][lane]["buffer"]) == len(early["lanes"][lane]["buffer"]) == \
            tiny_config(demo_dir).pack_buffer
    assert len(repr(late)) < 2 * len(repr(early)) + 64


def test_merge_refuses_states_of_diverged_ranks(demo_dir):
    """Two ranks that planned the same lane must agree on it: otherwise their data diverged."""
    a = build_loader(tiny_config(demo_dir), seed=7, dp_rank=0, dp_size=2, rows_per_step=1, plan_replicas=[1])
    b = build_loader(tiny_config(demo_dir, shuffle_window=5), seed=7, dp_rank=1, dp_size=2, rows_per_step=1,
                     plan_replicas=[0])
    next(a), next(b)
    with pytest.raises(LoaderStateError, match="stream_checksum"):
        merge_states([a.state_dict(), b.state_dict()])
    state = b.state_dict()
    state["stream_checksum"] = a.state_dict()["stream_checksum"]
    with pytest.raises(LoaderStateError, match="different states of lane"):
        merge_states([a.state_dict(), state])
    assert merge_states([a.state_dict(), a.state_dict()]) == a.state_dict()
