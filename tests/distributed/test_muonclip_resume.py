"""MuonClip resumes bit for bit on a parallel layout (the real job: launch.train, torchrun).

pp=2 vpp=2 ep=2 dp=2 with DEP (4 gloo ranks) on the demo data, tau low enough that QK-Clip
acts: Muon's momentum lives in ZeRO-1 shards (dense matrices over the 2 DP ranks, each
expert on its EP rank) and every rank writes and reads only its pieces. Run A trains 4
steps with a checkpoint every 2; run B starts from a copy of A's step-2 checkpoint and
trains to step 4: B's metrics (steps 2, 3) and every tensor of its step-4 checkpoint
(parameters, router biases, Muon momentum, AdamW moments) equal A's exactly. The
deliberate break (momentum dropped on resume) is caught by the single-process test
(tests/trainer/test_muonclip_resume.py), which shares this resume path.
"""
import shutil

import pytest

from tests.distributed.test_resume import LAYOUT, finish, metrics, torchrun
from trainer.checkpoint import checkpoints, read_tensors

pytestmark = pytest.mark.slow  # 4 gloo ranks under torchrun, twice

STEPS = 4


def test_muonclip_clean_resume_on_four_ranks_is_bitwise(tmp_path, demo_dataset):
    args = [*LAYOUT, "--data.uri", str(demo_dataset), "--train.steps", str(STEPS),
            "--optim.name", "muonclip", "--optim.qk_clip_tau", "0.15", "--job.tensorboard",
            "false"]
    finish(torchrun(tmp_path / "a", *args))
    saved = checkpoints(tmp_path / "a" / "checkpoints")  # newest first
    final_a = read_tensors(saved[0])
    assert any(".experts." in k and k.endswith(".momentum") for k in final_a)
    assert any(k.endswith("q_up.weight.momentum") for k in final_a)
    step2 = saved[-1]
    assert step2.name == "step_00000002"
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(step2, tmp_path / "b" / "checkpoints" / step2.name)
    finish(torchrun(tmp_path / "b", *args, "--resume", "auto"))
    assert metrics(tmp_path / "b") == metrics(tmp_path / "a")[2:]
    final_b = read_tensors(checkpoints(tmp_path / "b" / "checkpoints")[0])
    assert final_b.keys() == final_a.keys()
    different = [k for k in final_a if not final_a[k].equal(final_b[k])]
    assert not different, different[:5]
