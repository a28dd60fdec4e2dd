"""Sharded ZeRO-1 checkpoints: a dp=4 run's checkpoint loads into pp=2 vpp=2 ep=2 dp=2 and
into one process (float tolerance), and continues bitwise on its own layout in bf16.

The reference trains at pp=1 ep=2 dp=4 with DEP (dense state sharded 4 ways, expert
state over expert-DP 2, encoder state over the world) and small ZeRO-1 buckets, so
parameters straddle shard boundaries and every rank writes pieces of most of them.
Resumes start from its step-2 checkpoint: the next steps' losses and the final
parameters depend on the re-sharded optimizer state, not only on the weights.
Tolerances as in test_equivalence.py (1e-5, AdamW eps 1e-6): another layout sums in
another order. The fp32 bitwise resume on the same layout is tests/distributed/
test_resume.py (pp=2 vpp=2 ep=2 dp=2, now through these sharded checkpoints).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.launcher import ROOT, free_port
from trainer.checkpoint import read_tensors

STEPS = 4
ARGS = ["--config", "configs/tiny.toml", "--data.uri", "synthetic", "--train.steps", str(STEPS),
        "--train.global_batch", "4", "--data.seq_len", "32", "--checkpoint.interval", "2",
        "--checkpoint.keep", "5", "--parallel.bucket_numel", "30000", "--optim.eps", "1e-6",
        "--optim.warmup_steps", "1", "--job.tensorboard", "false"]
DP4 = ["--parallel.ep", "2", "--parallel.dp", "4"]
RTOL = 1e-5


def launch(run_dir: Path, nproc: int, *extra: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               PYTHONWARNINGS="ignore::UserWarning")
    if nproc == 1:
        cmd = [sys.executable, "-m", "launch.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m",
               "launch.train"]
    proc = subprocess.run(cmd + ARGS + ["--job.run_dir", str(run_dir), *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def metrics(run_dir: Path) -> list[tuple]:
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records]


def final(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_tensors(run_dir / "checkpoints" / f"step_{STEPS:08d}")


def start(run_dir: Path) -> str:
    return str(run_dir / "checkpoints" / "step_00000002")


@pytest.fixture(scope="module")
def dp4_fp32(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dp4_fp32")
    launch(run_dir, 4, *DP4)
    return run_dir


@pytest.mark.slow
def test_dp4_checkpoint_loads_into_pp2_dp2_and_one_process(tmp_path, dp4_fp32):
    layouts = {"pp2_vpp2_ep2_dp2": (4, ["--parallel.pp", "2", "--parallel.vpp", "2",
                                        "--parallel.ep", "2", "--parallel.dp", "2"]),
               "one_process": (1, [])}
    ref = {step: (loss, norm) for step, loss, norm in metrics(dp4_fp32)}
    ref_tensors = final(dp4_fp32)
    for name, (nproc, layout) in layouts.items():
        launch(tmp_path / name, nproc, *layout, "--resume", start(dp4_fp32))
        got = metrics(tmp_path / name)
        assert [s for s, _, _ in got] == [2, 3], name
        for step, loss, norm in got:
            assert abs(loss - ref[step][0]) <= RTOL * abs(ref[step][0]), (name, step, loss)
            assert abs(norm - ref[step][1]) <= RTOL * abs(ref[step][1]), (name, step, norm)
        tensors = final(tmp_path / name)
        for key, want in ref_tensors.items():
            if key.startswith("model."):
                assert torch.allclose(tensors[key], want, rtol=RTOL, atol=RTOL), (name, key)
    logs = [(tmp_path / "pp2_vpp2_ep2_dp2" / "logs" / f"rank{r}.log").read_text()
            for r in range(4)]
    assert all("checkpoint files this rank read" in log for log in logs)


@pytest.mark.slow
def test_bf16_dp4_checkpoint_resumes_bitwise_on_its_layout(tmp_path_factory):
    bf16 = [*DP4, "--train.dtype", "bf16", "--train.steps", "3"]
    reference = tmp_path_factory.mktemp("dp4_bf16")
    launch(reference, 4, *bf16)
    tensors = read_tensors(reference / "checkpoints" / "step_00000003")
    assert any(k.endswith(".master") for k in tensors)
    assert tensors["model.lm.head.weight"].dtype == torch.bfloat16
    resumed = tmp_path_factory.mktemp("dp4_bf16_resumed")
    launch(resumed, 4, *bf16, "--resume", start(reference))
    assert metrics(resumed) == metrics(reference)[2:]
    again = read_tensors(resumed / "checkpoints" / "step_00000003")
    assert again.keys() == tensors.keys()
    different = [k for k in tensors if not tensors[k].equal(again[k])]
    assert not different, different[:5]
