"""Checkpoint integrity in one process: resume is bitwise, damage is detected, mismatches refused."""
import json
import warnings

import pytest

from launch.train import main as train_main
from model.config import ConfigError
from trainer.checkpoint import checkpoints, read_tensors, verify

ARGS = ["--config", "configs/tiny.toml", "--data.uri", "synthetic", "--train.steps", "4",
        "--train.global_batch", "2",
        "--data.seq_len", "48", "--checkpoint.interval", "2", "--checkpoint.keep", "5"]


def run(run_dir, *extra):
    assert train_main(ARGS + ["--job.run_dir", str(run_dir), *extra]) == 0
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref")
    return run_dir, run(run_dir)


@pytest.mark.slow  # three training runs
def test_resume_is_bitwise_identical(tmp_path, reference):
    ref_dir, ref = reference
    assert [p.name for p in checkpoints(ref_dir / "checkpoints")] == ["step_00000004",
                                                                     "step_00000002"]
    # an interrupted copy: only the step-2 checkpoint survived
    run(tmp_path, "--train.steps", "4")
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000004")
    resumed = run(tmp_path, "--resume", "auto")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in resumed] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in ref]
    a = read_tensors(ref_dir / "checkpoints" / "step_00000004")
    b = read_tensors(tmp_path / "checkpoints" / "step_00000004")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def truncate(data: bytes) -> bytes:
    return data[:1000]


def flip_bytes(data: bytes) -> bytes:
    """Same size, 16 bytes inverted in the middle of the tensor data: only the crc sees it."""
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 16]) + data[middle + 16:]


@pytest.mark.slow  # two training runs each
@pytest.mark.parametrize("damage,problem", [(truncate, "bytes"), (flip_bytes, "checksum")])
def test_damaged_checkpoint_is_skipped(tmp_path, damage, problem):
    run(tmp_path)
    newest = checkpoints(tmp_path / "checkpoints")[0]
    data = next(newest.glob("*.distcp"))
    size = data.stat().st_size
    data.write_bytes(damage(data.read_bytes()))
    assert (data.stat().st_size == size) == (damage is flip_bytes)
    assert problem in (verify(newest) or "intact"), verify(newest)
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000004"):
        resumed = run(tmp_path, "--resume", "auto")
    assert resumed[0]["step"] == 0 and resumed[-1]["step"] == 3  # steps 2, 3 redone from step 2
    assert len(resumed) == 4


def test_empty_run_dir_starts_fresh_and_tmp_dirs_are_ignored(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step_00000009").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip, nothing to warn about
        records = run(tmp_path, "--resume", "auto", "--train.steps", "1",
                      "--checkpoint.interval", "0")
    assert [r["step"] for r in records] == [0]


@pytest.mark.slow  # needs the reference run
def test_other_model_config_is_refused(tmp_path, reference, capsys):
    ref_dir, _ = reference
    code = train_main(ARGS + ["--job.run_dir", str(tmp_path), "--model.lm.expert_hidden", "64",
                              "--resume", str(ref_dir / "checkpoints" / "step_00000002")])
    assert code == 2
    err = capsys.readouterr().err
    assert "saved for another model config" in err and "expert_hidden: checkpoint 128, now 64" in err


def test_resume_path_must_be_a_complete_checkpoint(tmp_path, capsys):
    assert train_main(ARGS + ["--job.run_dir", str(tmp_path), "--resume", str(tmp_path)]) == 2
    assert "no MANIFEST.json" in capsys.readouterr().err


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_same_size_corruption_is_found_while_loading_and_auto_falls_back(tmp_path):
    run(tmp_path)
    newest = checkpoints(tmp_path / "checkpoints")[0]
    _flip_a_byte(next(newest.glob("*.distcp")))
    assert verify(newest, checksums=False) is None  # sizes still match: found only by the crc
    assert "checksum" in verify(newest)
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000004.*checksum"):
        resumed = run(tmp_path, "--resume", "auto")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]  # steps 2, 3 redone from step 2


def _multi_file_checkpoint(directory):
    """A checkpoint with one file per tensor, so a load can read only some of the files."""
    import torch
    import torch.distributed.checkpoint as dcp
    from trainer.checkpoint import DCP_METADATA, MANIFEST, _file_entry

    model = {"a": torch.arange(6.0), "b": torch.ones(4), "c": torch.zeros(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model}, storage_writer=dcp.FileSystemWriter(
            str(directory), single_file_per_rank=False))
    names = sorted(p.name for p in directory.glob("*.distcp")) + [DCP_METADATA]
    (directory / MANIFEST).write_text(json.dumps(
        {"world": 1, "files": {n: _file_entry(directory / n) for n in names}}))
    return model


def test_a_load_checks_only_the_files_it_reads(tmp_path):
    import torch
    from trainer.checkpoint import CheckpointManager, CorruptCheckpoint

    saved = _multi_file_checkpoint(tmp_path)

    def load(*keys):
        model = {k: torch.empty_like(saved[k]) for k in keys}
        checked = CheckpointManager.load(tmp_path, model, {}, same_world=False)
        assert all(torch.equal(model[k], saved[k]) for k in keys)
        return {name for name in checked if name.endswith(".distcp")}

    assert len(list(tmp_path.glob("*.distcp"))) == 3
    (file_of_b,) = load("b")
    assert load("a", "c").isdisjoint({file_of_b}) and len(load("a", "c")) == 2
    _flip_a_byte(tmp_path / file_of_b)
    load("a", "c")  # the damaged file is not read, so not checked: no error
    with pytest.raises(CorruptCheckpoint, match=f"{file_of_b} does not match its checksum"):
        load("b")


def test_rank0_refuses_to_publish_a_manifest_that_misses_a_file(tmp_path):
    from types import SimpleNamespace
    from trainer.checkpoint import DCP_METADATA, META, MANIFEST_PARTS, CheckpointManager

    tmp = tmp_path / ".tmp-step_00000001"
    (tmp / MANIFEST_PARTS).mkdir(parents=True)
    (tmp / MANIFEST_PARTS / "0.json").write_text(json.dumps(
        {DCP_METADATA: {"bytes": 1, "crc32": 0}, META: {"bytes": 1, "crc32": 0}}))
    metadata = SimpleNamespace(storage_data={0: SimpleNamespace(relative_path="__1_0.distcp")})
    problem = CheckpointManager(tmp_path, keep=1)._finish(
        tmp, tmp_path / "step_00000001", tmp / MANIFEST_PARTS, metadata)
    assert "__1_0.distcp" in problem and "no rank's manifest part" in problem
    assert not (tmp_path / "step_00000001").exists()
