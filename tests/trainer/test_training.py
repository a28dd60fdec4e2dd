"""Single-process training: the entry point writes metrics, runs are reproducible, tiny overfits."""
import json

import pytest

import torch

from dataloader.synthetic import SyntheticBatches, SyntheticConfig
from launch.train import main as train_main
from model.config import preset
from trainer.config import OptimSection
from trainer.single_process import SingleProcessEngine

torch.set_num_threads(1)


def _run(run_dir, *extra):
    argv = ["--config", "configs/tiny.toml", "--data.uri", "synthetic", "--job.run_dir", str(run_dir),
            "--train.steps", "3",
            "--train.global_batch", "2", "--data.seq_len", "64", *extra]
    assert train_main(argv) == 0
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_entry_point_writes_metrics_and_is_bitwise_reproducible(tmp_path):
    first = _run(tmp_path / "a")
    second = _run(tmp_path / "b")
    assert [r["step"] for r in first] == [0, 1, 2]
    for r in first:
        assert {"step", "loss", "grad_norm", "lr", "tokens", "step_time_s"} <= r.keys()
        assert r["tokens"] == 2 * 64
    assert [r["loss"] for r in first] == [r["loss"] for r in second]
    assert [r["grad_norm"] for r in first] == [r["grad_norm"] for r in second]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["steps"] == 3


@pytest.mark.slow  # 120 optimizer steps
def test_tiny_overfits_a_fixed_batch():
    cfg = preset("tiny")
    data = SyntheticBatches(SyntheticConfig(seq_len=48, vocab_size=cfg.lm.vocab_size,
                                            media_token_id=cfg.media_token_id,
                                            patch_dim=cfg.vision.patch_dim, max_side=4), seed=0)
    batch = data.global_batch(0, rows=2)
    assert batch.media, "the fixed batch must exercise the vision path"
    engine = SingleProcessEngine(cfg, OptimSection(weight_decay=0.0), micro_batch=2, seed=0)
    losses = [engine.step(batch, lr=3e-3)[0] for _ in range(120)]
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
