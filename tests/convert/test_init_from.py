"""A run starts from an imported (weights-only) checkpoint with --init_from."""
from __future__ import annotations

import json

import pytest
import torch

from tests.convert.hf_models import save_tiny_deepseek

from launch.convert import main as convert  # noqa: E402
from launch.train import main as train_main  # noqa: E402
from model.config import ConfigError  # noqa: E402
from trainer.checkpoint import CheckpointManager, read_tensors  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.train import build_engine, resume_step  # noqa: E402


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    hf_dir = save_tiny_deepseek(root / "hf", yarn=False, vocab_size=2048)
    assert convert(["import", "--from", "hf", str(hf_dir), "--to", str(root / "ckpt"),
                    "--vision-preset", "tiny"]) == 0
    return root / "ckpt"


ARGS = ["--config", "configs/tiny.toml", "--data.uri", "synthetic", "--train.global_batch", "2",
        "--data.seq_len", "48"]


def test_init_from_loads_every_lm_tensor_and_seeds_the_rest(imported, tmp_path):
    """Catches: weights not loaded (left at the seed), the vision encoder clobbered, the
    model config not taken from the checkpoint."""
    cfg = load_config(ARGS + ["--init_from", str(imported), "--job.run_dir", str(tmp_path)])
    assert cfg.model.lm.hidden == 64 and cfg.model.lm.num_experts == 8
    engine = build_engine(cfg)
    seeded = {n: t.clone() for n, t in build_engine(cfg).named_tensors().items()}
    assert resume_step(cfg, engine, None, CheckpointManager(tmp_path, 1)) == 0
    stored = read_tensors(imported)
    ours = engine.named_tensors()
    lm = [n for n in ours if n.startswith("lm.")]
    assert lm and all(torch.equal(ours[n], stored["model." + n].to(ours[n].dtype)) for n in lm)
    assert any(not torch.equal(ours[n], seeded[n]) for n in lm)
    vision = [n for n in ours if n.startswith("vision.")]
    assert vision and all(torch.equal(ours[n], seeded[n]) for n in vision)


def test_run_from_an_import_and_refusals(imported, tmp_path):
    assert train_main(ARGS + ["--init_from", str(imported), "--train.steps", "1",
                              "--job.run_dir", str(tmp_path / "run")]) == 0
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["model"]["lm"]["hidden"] == 64 and written["init_from"] == str(imported)
    loss = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert torch.isfinite(torch.tensor(loss))
    with pytest.raises(ConfigError, match="drop --model.preset"):
        load_config(ARGS + ["--init_from", str(imported), "--model.preset", "tiny"])
    with pytest.raises(ConfigError, match="--init_from"):  # --resume of a weights-only one
        cfg = load_config(ARGS + ["--init_from", str(imported), "--resume", str(imported)])
        resume_step(cfg, build_engine(cfg), None, CheckpointManager(tmp_path, 1))
    with pytest.raises(ConfigError, match="model config"):  # a --model.* that disagrees
        cfg = load_config(ARGS + ["--init_from", str(imported), "--model.lm.layers", "2"])
        resume_step(cfg, build_engine(cfg), None, CheckpointManager(tmp_path, 1))
