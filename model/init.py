"""Parameter initialisation keyed by parameter name, independent of how the model is split.

Each parameter draws from its own generator seeded by (seed, full name). A
pipeline chunk, an expert-parallel shard and the whole single-process model
therefore start from identical values for every parameter they share, without
any rank building (or communicating) the whole model.

`materialize` is how a model is put on its device: build it on the meta device (no
memory, no default init), allocate it uninitialised on the target device, then give
every parameter its value by name and every buffer its value from its module's
`reset_buffers()`. A 1T-parameter model is never held anywhere whole.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from model.param_names import global_named_tensors


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def initialize(module: nn.Module, seed: int, std: float = 0.02, prefix: str = "") -> None:
    """Matrices and tables ~ N(0, std); 1-D weights (norm scales) = 1; biases = 0.

    Values are drawn on the CPU (one generator per global name) and copied to the
    parameter's device, so a model built on CUDA starts from the CPU run's values."""
    for name, param in global_named_tensors(module, prefix=prefix.rstrip(".")).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            param.zero_()
        elif param.ndim == 1:
            param.fill_(1.0)
        else:
            gen = torch.Generator().manual_seed(_name_seed(seed, name))
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def materialize(module: nn.Module, device: torch.device | str, seed: int, std: float = 0.02,
                prefix: str = "") -> nn.Module:
    """Allocate a (meta-built) module on `device` and initialise it: parameters by name,
    buffers by the `reset_buffers()` of the modules that own them."""
    module.to_empty(device=device)
    initialize(module, seed, std, prefix)
    with torch.no_grad():
        for sub in module.modules():
            if hasattr(sub, "reset_buffers"):
                sub.reset_buffers()
    return module
