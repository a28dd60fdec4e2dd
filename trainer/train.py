"""The step loop: data -> engine step -> metrics, the same whatever the parallel layout."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dataloader.synthetic import SyntheticBatches, SyntheticConfig
from trainer.config import JobConfig, to_dict
from trainer.lr_schedule import learning_rate
from trainer.metrics import MetricsWriter
from trainer.single_process import SingleProcessEngine


def synthetic_data(cfg: JobConfig) -> SyntheticBatches:
    return SyntheticBatches(SyntheticConfig(
        seq_len=cfg.data.seq_len, vocab_size=cfg.model.lm.vocab_size,
        media_token_id=cfg.model.media_token_id, patch_dim=cfg.model.vision.patch_dim,
        media_per_seq=cfg.data.media_per_seq, max_side=cfg.data.max_image_patches_side,
        max_frames=cfg.model.vision.max_frames), seed=cfg.train.seed)


def train(cfg: JobConfig, rank: int = 0) -> list[dict]:
    """Run `cfg.train.steps` steps; return the per-step metric records."""
    run_dir = Path(cfg.job.run_dir)
    is_logger = rank == 0
    if is_logger:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    torch.manual_seed(cfg.train.seed)
    data = synthetic_data(cfg)
    engine = SingleProcessEngine(cfg.model, cfg.optim, cfg.train.micro_batch, cfg.train.seed)
    metrics = MetricsWriter(run_dir, is_logger, cfg.job.log_every)
    records = []
    for step in range(cfg.train.steps):
        batch = data.global_batch(step, cfg.train.global_batch)
        batch.validate(cfg.model.media_token_id)
        lr = learning_rate(step, cfg.optim, cfg.train.steps)
        start = time.perf_counter()
        loss, grad_norm = engine.step(batch, lr)
        elapsed = time.perf_counter() - start
        tokens = batch.tokens.numel()
        record = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                  "tokens": tokens, "loss_tokens": batch.num_loss_tokens(),
                  "step_time_s": elapsed, "tokens_per_s": tokens / elapsed}
        metrics.write(record)
        records.append(record)
    metrics.close()
    return records
