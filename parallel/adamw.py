"""AdamW as a ZeRO-1 update rule: the math on flat fp32 shards.

ZeRO-1 steps a contiguous slice of a flat bucket, not a list of parameters, so the
update is written for one flat tensor per state (param, grad, m, v) plus the ranges
of that slice that receive weight decay (computed once per bucket by `AdamW.prepare`). The operations and their order copy
``torch.optim.AdamW`` (single-tensor path, amsgrad=False, maximize=False) so that a
sharded run matches an unsharded one to float rounding of the same elementwise ops:

    param[decayed] *= 1 - lr * weight_decay          (decoupled decay, before moments)
    m = m.lerp(g, 1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g
    param -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Elements of padding have g = m = v = param = 0 and stay 0 (0 / (0 + eps) = 0), so the
whole shard, padding included, can be updated with a handful of kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from parallel.update_rule import BucketShard


@dataclass(frozen=True)
class AdamWConfig:
    """Hyper-parameters that stay fixed over a run; the learning rate is passed per step
    because the trainer owns the schedule."""

    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"AdamW betas must lie in [0, 1), got beta1={self.beta1}, "
                             f"beta2={self.beta2}")
        if self.eps <= 0.0:
            raise ValueError(f"AdamW eps must be > 0, got {self.eps}")
        if self.weight_decay < 0.0:
            raise ValueError(f"AdamW weight_decay must be >= 0, got {self.weight_decay}")


def adamw_update_(
    param_S: torch.Tensor,
    grad_S: torch.Tensor,
    exp_avg_S: torch.Tensor,
    exp_avg_sq_S: torch.Tensor,
    *,
    lr: float,
    step: int,
    config: AdamWConfig,
    decay_ranges: Sequence[tuple[int, int]],
) -> None:
    """Update ``param_S``, ``exp_avg_S`` and ``exp_avg_sq_S`` in place.

    ``step`` is the 1-based count of updates including this one (bias correction).
    ``decay_ranges`` are [start, end) element ranges of the flat tensors whose params
    are weight-decayed; everything else (biases, norm scales, padding) is not.
    """
    if step < 1:
        raise ValueError(f"AdamW step count must be >= 1 (1 for the first update), got {step}")
    shapes = {t.shape for t in (param_S, grad_S, exp_avg_S, exp_avg_sq_S)}
    if len(shapes) != 1 or param_S.dim() != 1:
        raise ValueError(f"adamw_update_ needs four flat tensors of one length, got shapes "
                         f"{[tuple(s) for s in shapes]}")
    if config.weight_decay != 0.0:
        keep = 1.0 - lr * config.weight_decay
        for start, end in decay_ranges:
            param_S[start:end].mul_(keep)
    exp_avg_S.lerp_(grad_S, 1.0 - config.beta1)
    exp_avg_sq_S.mul_(config.beta2).addcmul_(grad_S, grad_S, value=1.0 - config.beta2)
    bias_correction1 = 1.0 - config.beta1**step
    bias_correction2 = 1.0 - config.beta2**step
    step_size = lr / bias_correction1
    denom_S = (exp_avg_sq_S.sqrt() / bias_correction2**0.5).add_(config.eps)
    param_S.addcdiv_(exp_avg_S, denom_S, value=-step_size)


class AdamW:
    """The `UpdateRule` for AdamW: moments ``exp_avg`` and ``exp_avg_sq`` per element."""

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, config: AdamWConfig = AdamWConfig()):
        self.config = config

    def prepare(self, shard: BucketShard) -> list[tuple[int, int]]:
        """The shard's weight-decayed ranges (merged), so a step does not recompute them."""
        return shard.layout.decay_ranges(shard.rank)

    def update(self, shard: BucketShard, grad_S: torch.Tensor, *, lr: float, step: int) -> None:
        adamw_update_(shard.master, grad_S, shard.state["exp_avg"], shard.state["exp_avg_sq"],
                      lr=lr, step=step, config=self.config, decay_ranges=shard.plan)
