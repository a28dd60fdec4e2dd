"""Faults from outside, as a new user met them, on real torchrun jobs (2 gloo ranks, pp=2,
synthetic data, a run far longer than the test waits):

    SIGSTOP of one rank        -> the others report where they wait and who is silent; the job
                                  exits non-zero (it hung silently for 30 min before)
    SIGKILL of the agent       -> the orphaned workers stop with a checkpoint (they trained on)
    SIGINT (Ctrl-C) to agent   -> every rank stops cleanly with a checkpoint (it left a wall
                                  of KeyboardInterrupt tracebacks and no checkpoint); SIGTERM
                                  takes the same path in torchrun and in our ranks
                                  (test_resume.py sends SIGTERM to a worker)

The model is `tiny` made smaller still (2 layers, 4 experts): these tests are about
processes, and a smaller checkpoint saves seconds on a busy machine.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.launcher import ROOT, free_port, worker_pids
from trainer.checkpoint import checkpoints

pytestmark = pytest.mark.slow

ARGS = ["--config", "configs/tiny.toml", "--data.uri", "synthetic", "--train.steps", "100000",
        "--train.global_batch", "2", "--data.seq_len", "32", "--parallel.pp", "2",
        "--job.tensorboard", "false", "--model.lm.layers", "2", "--model.lm.num_experts", "4",
        "--model.lm.hidden", "128", "--model.lm.dense_hidden", "256", "--model.vision.layers", "1"]


def start(run_dir: Path, *extra: str, shutdown_timeout: int = 5) -> subprocess.Popen:
    """`shutdown_timeout`: how long torchrun waits for its workers to exit after it forwarded a
    signal to them or one of them failed, before it SIGKILLs them (its default is 30 s)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               PYTHONWARNINGS="ignore::UserWarning")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "--shutdown-timeout", str(shutdown_timeout),
           "-m", "launch.train", *ARGS, "--job.run_dir", str(run_dir), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def steps_done(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, steps: int = 2) -> None:
    deadline = time.time() + 240
    while steps_done(run_dir) < steps:
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline, "the job did not start training"
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has not collected it


def kill_all(pids) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_frozen_rank_is_reported_and_ends_the_job(tmp_path):
    proc = start(tmp_path, "--job.step_timeout_s", "15", "--job.collective_timeout_s", "600")
    pids = []
    try:
        wait_for_steps(tmp_path, proc)
        pids = worker_pids(proc)
        os.kill(pids[1], signal.SIGSTOP)
        out, _ = proc.communicate(timeout=180)  # without the watchdog: a 600 s silent hang
    finally:
        kill_all(pids)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "watchdog: rank 0 made no progress for" in out, out[-4000:]
    assert "it is waiting in: step" in out
    assert re.search(r"ranks waiting: 0; no report within [\d.]+ s from rank\(s\) 1:", out)


def test_workers_stop_when_the_agent_is_killed(tmp_path):
    proc = start(tmp_path)
    pids = []
    try:
        wait_for_steps(tmp_path, proc)
        pids = worker_pids(proc)
        proc.kill()  # SIGKILL: the agent can tell nobody
        proc.wait()
        deadline = time.time() + 120
        while any(alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.5)
        orphans = [p for p in pids if alive(p)]
    finally:
        kill_all(pids)
    assert not orphans, f"workers {orphans} outlived their agent"
    log = (tmp_path / "logs" / "rank1.log").read_text()
    assert f"the torchrun agent (pid {proc.pid}) is gone" in log
    saved = checkpoints(tmp_path / "checkpoints")
    assert saved and int(saved[0].name.split("_")[1]) == steps_done(tmp_path)


def test_ctrl_c_to_the_agent_stops_every_rank_cleanly(tmp_path):
    proc = start(tmp_path, shutdown_timeout=120)  # time to finish the step and checkpoint
    try:
        wait_for_steps(tmp_path, proc)
        proc.send_signal(signal.SIGINT)  # the agent forwards it to the workers
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # torch elastic re-raises the signal it got (SignalException): torchrun exits 1 even
    # though every rank stopped cleanly (README, "Failure modes")
    assert proc.returncode == 1, out[-4000:]
    assert "stopped on request" in out and "KeyboardInterrupt" not in out
    logs = [(tmp_path / "logs" / f"rank{r}.log").read_text() for r in (0, 1)]
    assert not any("Traceback" in log for log in logs), logs[1][-3000:]
    saved = checkpoints(tmp_path / "checkpoints")
    assert saved and int(saved[0].name.split("_")[1]) == steps_done(tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(len(records)))
