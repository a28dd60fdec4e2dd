"""Linear warm-up, then cosine decay to `min_lr`, then flat at `min_lr`."""
from __future__ import annotations

import math

from trainer.config import OptimSection


def learning_rate(step: int, optim: OptimSection, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based)."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay = optim.decay_steps or max(total_steps - optim.warmup_steps, 1)
    progress = min((step - optim.warmup_steps) / decay, 1.0)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))
