"""MuonClip resumes bit for bit: Muon's momentum (and AdamW's moments of the rest) travel
in the checkpoint as `optim.<param>.momentum` / `exp_avg` / `exp_avg_sq`.

One process (MuonClip runs on a ZeRO-1 of one there), synthetic data, tau low enough
that QK-Clip acts every step. Run A trains 4 steps with a checkpoint every 2; run B starts
from A's step-2 checkpoint and trains to step 4: B's step-4 checkpoint and metrics equal
A's exactly. A resume that dropped the momentum (zeroed after the load) must differ.
"""
import shutil

import pytest
import torch

from trainer.checkpoint import checkpoints, read_tensors
from trainer.config import load_config
from trainer.train import SingleProcessEngine, train

ARGS = ["--config", "configs/tiny.toml", "--data.uri", "synthetic", "--train.steps", "4",
        "--train.global_batch", "2", "--data.seq_len", "48", "--optim.name", "muonclip",
        "--optim.qk_clip_tau", "0.15", "--optim.warmup_steps", "1",
        "--checkpoint.interval", "2", "--checkpoint.keep", "5", "--job.tensorboard", "false"]


def _run(run_dir, resume="none", drop_momentum=False):
    torch.set_num_threads(1)
    cfg = load_config(ARGS + ["--job.run_dir", str(run_dir), "--resume", resume])
    cfg.validate(world_size=1)
    engine = SingleProcessEngine(cfg.model, cfg.optim, cfg.train.micro_batch, cfg.train.seed)
    if drop_momentum:
        finish_load = engine.finish_load

        def finish_then_forget(step):
            finish_load(step)
            for group in engine.zero1.groups:
                group.state_flat.get("momentum", torch.zeros(0)).zero_()
        engine.finish_load = finish_then_forget
    records = train(cfg, engine=engine)
    final = checkpoints(run_dir / "checkpoints")[0]  # newest first
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records], read_tensors(final)


@pytest.mark.slow
def test_muonclip_resume_is_bitwise(tmp_path):
    records_a, tensors_a = _run(tmp_path / "a")
    assert any(k.endswith(".momentum") for k in tensors_a), "no Muon state in the checkpoint"
    assert any(k.endswith("q_up.weight.momentum") for k in tensors_a)
    step2 = checkpoints(tmp_path / "a" / "checkpoints")[-1]
    for name, drop in (("b", False), ("mutant", True)):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        shutil.copytree(step2, tmp_path / name / "checkpoints" / step2.name)
        records, tensors = _run(tmp_path / name, resume="auto", drop_momentum=drop)
        same = records == records_a[2:] and tensors.keys() == tensors_a.keys() and all(
            torch.equal(tensors[k], tensors_a[k]) for k in tensors_a)
        assert same != drop, f"{name}: resumed run {'equals' if same else 'differs from'} A"
