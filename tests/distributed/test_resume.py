"""Real jobs: interrupted and resumed runs are bitwise identical; resume into another dp;
two torchrun "nodes" on this machine equal one node of the same world size.

Layout pp=2 vpp=2 ep=2 dp=2 (4 gloo ranks) with DEP, reading the demo dataset through the
streaming loader (its state travels in the checkpoint). Interruptions come from outside,
as in production: SIGTERM to one worker (clean stop: all ranks agree, checkpoint, exit),
and SIGKILL of one worker under `torchrun --max-restarts 1` (the job comes back and
resumes from the newest complete checkpoint by itself).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.launcher import ROOT, free_port, worker_pids as workers
from trainer.checkpoint import checkpoints, read_tensors

pytestmark = pytest.mark.slow  # several gloo ranks under torchrun

STEPS = 6
LAYOUT = ["--parallel.pp", "2", "--parallel.vpp", "2", "--parallel.ep", "2", "--parallel.dp", "2",
          "--parallel.encoder", "dep"]
ARGS = ["--config", "configs/tiny.toml", "--train.steps", str(STEPS), "--train.global_batch", "8",
        "--data.seq_len", "64", "--checkpoint.interval", "2", "--checkpoint.keep", "10"]


@pytest.fixture(scope="module", autouse=True)
def demo_dataset(demo_dataset):  # the session's (tests/conftest.py), on every job's command
    ARGS.extend(["--data.uri", str(demo_dataset)])
    yield demo_dataset
    del ARGS[-2:]


def torchrun(run_dir: Path, *extra: str, nproc: int = 4, torchrun_args=()) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               PYTHONWARNINGS="ignore::UserWarning")
    rdzv = list(torchrun_args) or ["--master-addr", "127.0.0.1", "--master-port",
                                   str(free_port())]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *rdzv,
           "-m", "launch.train", *ARGS, "--job.run_dir", str(run_dir), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def metrics(run_dir: Path) -> list[tuple]:
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records]


def wait_for(condition, proc, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the job ended before the interruption point"
        assert time.time() < deadline, "timed out waiting for the interruption point"
        time.sleep(0.2)


def newest_step(run_dir: Path) -> int:
    found = checkpoints(run_dir / "checkpoints")
    return int(found[0].name.split("_")[1]) if found else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    finish(torchrun(run_dir, *LAYOUT))
    return run_dir


def final_tensors(run_dir: Path) -> dict:
    return read_tensors(run_dir / "checkpoints" / f"step_{STEPS:08d}")


def assert_bitwise_equal(run_dir: Path, reference: Path) -> None:
    assert metrics(run_dir) == metrics(reference)
    a, b = final_tensors(run_dir), final_tensors(reference)
    assert a.keys() == b.keys()
    different = [k for k in a if not a[k].equal(b[k])]
    assert not different, different[:5]


def test_clean_stop_and_resume_is_bitwise_identical(tmp_path, reference):
    proc = torchrun(tmp_path, *LAYOUT)
    wait_for(lambda: len(metrics_or_empty(tmp_path)) >= 2, proc)
    os.kill(workers(proc)[-1], signal.SIGTERM)  # one rank hears it; all agree to stop
    out = finish(proc)
    stopped_at = newest_step(tmp_path)
    assert "stopped on request" in out and 2 <= stopped_at < STEPS
    finish(torchrun(tmp_path, *LAYOUT, "--resume", "auto"))
    assert_bitwise_equal(tmp_path, reference)


def metrics_or_empty(run_dir: Path) -> list:
    try:
        return metrics(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_sigkill_under_max_restarts_recovers_bitwise(tmp_path, reference):
    proc = torchrun(tmp_path, *LAYOUT, "--resume", "auto",
                    torchrun_args=["--max-restarts", "1", "--rdzv-backend", "c10d",
                                   "--rdzv-endpoint", f"127.0.0.1:{free_port()}"])
    wait_for(lambda: newest_step(tmp_path) >= 2, proc)
    os.kill(workers(proc)[1], signal.SIGKILL)
    out = finish(proc)
    assert "exitcode: -9" in out  # torchrun saw the kill and restarted the workers
    assert_bitwise_equal(tmp_path, reference)


def test_resume_into_other_layouts_continues_the_same_run(tmp_path, reference):
    """Saved with pp=2 vpp=2 ep=2 dp=2 (4 ranks, the automatic layout Et|t|t|tL); resumed
    with dp=1 ep=1 (2 ranks) on another pipeline layout (E|t|ttt|L: an embedding-only and a
    head-only chunk) and in one process (pp=1): the same losses within float tolerance (the
    reduction order changes), so the same data sequence and the same optimizer state."""
    from launch.train import main as train_main

    start = reference / "checkpoints" / "step_00000002"
    finish(torchrun(tmp_path / "dp1", "--parallel.pp", "2", "--parallel.vpp", "2",
                    "--parallel.layout", "E|t|ttt|L", "--resume", str(start), nproc=2))
    assert train_main(ARGS + ["--job.run_dir", str(tmp_path / "pp1"), "--resume", str(start)]) == 0
    ref = {s: (loss, norm) for s, loss, norm in metrics(reference)}
    for run, steps in (("dp1", range(2, STEPS)), ("pp1", range(2, STEPS))):
        got = metrics(tmp_path / run)
        assert [s for s, _, _ in got] == list(steps)
        for step, loss, _ in got:
            assert abs(loss - ref[step][0]) <= 1e-5 * abs(ref[step][0]), (run, step, loss)


def test_two_nodes_equal_one_node(tmp_path, reference):
    """Every step's loss and grad norm and every final tensor, bitwise: same world, same
    layout, same number of steps (the LR schedule depends on train.steps)."""
    port = free_port()
    nodes = [torchrun(tmp_path / "run", *LAYOUT, nproc=2,
                      torchrun_args=["--nnodes", "2", "--node-rank", str(rank),
                                     "--rdzv-backend", "c10d", "--rdzv-id", "two-nodes",
                                     "--rdzv-endpoint", f"127.0.0.1:{port}"])
             for rank in (0, 1)]
    for node in nodes:
        finish(node)
    assert [s for s, _, _ in metrics(tmp_path / "run")] == list(range(STEPS))
    assert_bitwise_equal(tmp_path / "run", reference)
