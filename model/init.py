"""Parameter initialisation keyed by parameter name, independent of how the model is split.

Each parameter draws from its own generator seeded by (seed, full name). A
pipeline chunk, an expert-parallel shard and the whole single-process model
therefore start from identical values for every parameter they share, without
any rank building (or communicating) the whole model.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def initialize(module: nn.Module, seed: int, std: float = 0.02, prefix: str = "") -> None:
    """Matrices and tables ~ N(0, std); 1-D weights (norm scales) = 1; biases = 0."""
    for name, param in module.named_parameters(prefix=prefix.rstrip(".")):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            param.zero_()
        elif param.ndim == 1:
            param.fill_(1.0)
        else:
            gen = torch.Generator().manual_seed(_name_seed(seed, name))
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)
