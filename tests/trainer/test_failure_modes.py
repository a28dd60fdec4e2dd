"""What a new user hit, in one process: a checkpoint that runs code, DCP errors that escaped
as tracebacks, foreign directories in checkpoints/, a refused resume that had already
overwritten config.json, a forgotten option value, a full disk, a second job on a run
directory, a loader state resumed on synthetic data, and a misleading threads warning."""
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest
import torch

from launch.train import main as train_main
from model.config import ConfigError
from tests.distributed.launcher import ROOT
from trainer.checkpoint import CheckpointManager, _file_entry, checkpoints
from trainer.run_dir_lock import run_dir_lock

ARGS = ["--config", "configs/tiny.toml", "--data.uri", "synthetic", "--train.global_batch", "2",
        "--data.seq_len", "48", "--checkpoint.keep", "5"]


def run(run_dir, *extra) -> int:
    return train_main(ARGS + ["--job.run_dir", str(run_dir), *extra])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run of 2 steps with a checkpoint after each."""
    run_dir = tmp_path_factory.mktemp("saved")
    assert run(run_dir, "--train.steps", "2", "--checkpoint.interval", "1") == 0
    return run_dir


@pytest.fixture
def run_copy(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


def rewrite_metadata(checkpoint, payload: bytes) -> None:
    """What an attacker with write access to the run directory does: new .metadata, and a
    MANIFEST recomputed to match (it holds only sizes and crc32s)."""
    (checkpoint / ".metadata").write_bytes(payload)
    manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
    manifest["files"][".metadata"] = _file_entry(checkpoint / ".metadata")
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("resume", ["path", "auto"])
def test_checkpoint_metadata_that_runs_code_is_refused(run_copy, tmp_path, resume, capsys):
    marker = tmp_path / "pwned"
    newest = checkpoints(run_copy / "checkpoints")[0]
    rewrite_metadata(newest, pickle.dumps(_RunsCode(marker)))
    code = run(run_copy, "--train.steps", "3",
               "--resume", str(newest) if resume == "path" else "auto")
    assert code == 2
    assert not marker.exists(), "the checkpoint ran code"
    err = capsys.readouterr().err
    assert "refusing checkpoint" in err and "mkdir" in err and "not a checkpoint metadata type" in err


def test_checkpoint_with_a_pickled_entry_is_refused(run_copy, capsys):
    """A well-formed Metadata whose entry says "bytes": DCP would torch.load(weights_only=False)
    them from the data file, a second way to run code."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    from trainer.checkpoint_metadata import read_metadata

    newest = checkpoints(run_copy / "checkpoints")[0]
    metadata = read_metadata(newest)
    name = next(iter(metadata.state_dict_metadata))
    metadata.state_dict_metadata[name] = BytesStorageMetadata()
    rewrite_metadata(newest, pickle.dumps(metadata))
    assert run(run_copy, "--train.steps", "3", "--resume", str(newest)) == 2
    assert f"entry {name!r} is a BytesStorageMetadata" in capsys.readouterr().err


def test_dcp_failure_on_load_is_a_clear_refusal(saved):
    """DCP's CheckpointException is a BaseException: it escaped `except Exception`."""
    newest = checkpoints(saved / "checkpoints")[0]
    with pytest.raises(ConfigError, match="cannot load checkpoint .* into this layout: "
                                          "RuntimeError: Missing key .*model.not_in_checkpoint"):
        CheckpointManager.load(newest, {"not_in_checkpoint": torch.zeros(2)}, {}, same_world=False)


def test_foreign_directories_in_checkpoints_are_left_alone(run_copy):
    backup = run_copy / "checkpoints" / "step_00000002.bak"
    shutil.copytree(run_copy / "checkpoints" / "step_00000002", backup)
    assert run(run_copy, "--train.steps", "4", "--checkpoint.interval", "1",
               "--checkpoint.keep", "1", "--resume", "auto") == 0
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == [
        "step_00000002.bak", "step_00000004"]


def test_refused_resume_keeps_the_previous_config(run_copy, capsys):
    before = (run_copy / "config.json").read_text()
    assert run(run_copy, "--train.steps", "3", "--train.seed", "9", "--model.lm.expert_hidden",
               "64", "--resume", "auto") == 2
    assert "saved for another model config" in capsys.readouterr().err
    assert (run_copy / "config.json").read_text() == before


def test_an_option_is_not_taken_as_the_previous_option_value(tmp_path, capsys):
    assert train_main(["--job.run_dir", "--train.steps=2"]) == 2
    assert ("--job.run_dir needs a value, got the option '--train.steps=2'"
            in capsys.readouterr().err)


def test_loader_checkpoint_resumed_on_synthetic_data_is_refused(tmp_path, capsys):
    from launch.make_dataset import build
    from tests.dataloader.conftest import TINY

    build(str(tmp_path / "demo"), **TINY)
    common = ["--job.run_dir", str(tmp_path / "run"), "--train.steps", "2",
              "--data.seq_len", "64", "--checkpoint.interval", "1"]
    assert run(tmp_path / "run", "--data.uri", str(tmp_path / "demo"), *common[2:]) == 0
    assert run(tmp_path / "run", *common[2:], "--train.steps", "3", "--resume", "auto") == 2
    assert "not on synthetic data: resume it with that run's data.uri" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "demo" / "dataset.json").read_text())
    manifest["sources"] = list(manifest["sources"].values())
    (tmp_path / "demo" / "dataset.json").write_text(json.dumps(manifest))
    assert run(tmp_path / "other", "--data.uri", str(tmp_path / "demo"), *common[2:]) == 2
    err = capsys.readouterr().err
    assert "config error: data.uri=" in err and "malformed: 'sources'" in err
    assert "Traceback" not in err


def test_full_disk_while_saving_keeps_the_previous_checkpoint(run_copy, monkeypatch, capsys):
    from torch.distributed.checkpoint.filesystem import FileSystem

    real = FileSystem.create_stream

    class Full:  # a file that takes 100 bytes, then reports a full disk
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def create_stream(self, path, mode):
        import contextlib

        @contextlib.contextmanager
        def stream():
            with real(self, path, mode) as f:
                yield Full(f) if "w" in mode and str(path).endswith(".distcp") else f
        return stream()

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    assert run(run_copy, "--train.steps", "3", "--checkpoint.interval", "1",
               "--resume", "auto") == 1
    err = capsys.readouterr().err
    assert "no space left on" in err and "step-3 checkpoint" in err
    assert "step_00000002 is intact" in err
    assert [p.name for p in (run_copy / "checkpoints").iterdir()
            if p.name.startswith(".tmp")] == []
    assert [p.name for p in checkpoints(run_copy / "checkpoints")][0] == "step_00000002"


@pytest.mark.slow
def test_full_disk_for_real_says_so(tmp_path):
    """A real full filesystem (a 150 MiB tmpfs in a private mount namespace): torch.save
    reports only "unexpected pos", the job must say "no space left"."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs user namespaces (unshare -rm) to mount a small tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    train = [sys.executable, "-m", "launch.train", *ARGS, "--train.steps", "2",
             "--checkpoint.interval", "1", "--job.run_dir", str(mnt / "run")]
    script = (f"mount -t tmpfs -o size=150m tmpfs {mnt} && {' '.join(train)}; echo rc=$?; "
              f"ls -a {mnt}/run/checkpoints")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    text = out.stdout + out.stderr
    assert "rc=1" in text and "no space left on" in text, text[-3000:]
    assert "unexpected pos" not in text.split("rc=")[0].splitlines()[-1]
    assert "step_00000001" in text and ".tmp-step" not in text


def test_second_job_on_a_locked_run_dir_is_refused(tmp_path, capsys):
    with run_dir_lock(tmp_path / "run"):  # this process holds it, as another job's rank 0 would
        assert run(tmp_path / "run", "--train.steps", "1") == 2
    err = capsys.readouterr().err
    assert f"is in use by another job (pid {os.getpid()}" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"], "it wrote nothing"
    assert run(tmp_path / "run", "--train.steps", "1") == 0  # released: the next job runs


@pytest.mark.slow
def test_second_job_is_refused_while_the_first_finishes_untouched(tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "launch.train", *ARGS, "--job.run_dir", str(run_dir),
         "--train.steps", "12", "--job.tensorboard", "false"],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
            assert first.poll() is None, first.communicate()[0][-3000:]
            time.sleep(0.2)
        assert run(run_dir, "--train.steps", "12", "--train.seed", "7") == 2
        out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert f"is in use by another job (pid {first.pid} on" in capsys.readouterr().err
    assert first.returncode == 0, out[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(12))
    assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == 0
    assert (run_dir / "logs" / "rank0.log").read_text().count("environment:") == 1


def test_threads_warning_names_the_real_cause(monkeypatch):
    from launch.environment import check_environment

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK"):
        monkeypatch.setenv(key, "0")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = check_environment(4, 0)
        torch.set_num_threads(2)
        two = check_environment(4, 0)
    finally:
        torch.set_num_threads(threads)
    assert "4 ranks on 2 cores, 1 thread each" in one and "OMP_NUM_THREADS" not in one
    assert "x 2 threads (job.cpu_threads)" in two and "lower job.cpu_threads" in two


def test_watchdog_reports_where_it_waits_and_exits(tmp_path):
    """In a child process: a main thread that stops making progress."""
    script = tmp_path / "stuck.py"
    script.write_text("import time\nfrom trainer.watchdog import Watchdog\n"
                      "w = Watchdog(0.5)\nw.progress('start-up', timed=False)\ntime.sleep(1)\n"
                      "w.progress('step 3: waiting for a peer')\n"
                      "time.sleep(30)\n")
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert out.returncode == 124
    assert "rank 0 made no progress for" in out.stderr
    assert "waiting in: step 3: waiting for a peer" in out.stderr
    assert "time.sleep(30)" in out.stderr  # the main thread's stack says where
    from trainer.watchdog import _ranges
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and _ranges([]) == "none"
