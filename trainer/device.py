"""Which device a rank trains on, and the communication backend that goes with it.

    job.device   auto: this rank's GPU (torchrun's LOCAL_RANK) when CUDA is present, else CPU
                 cuda: the same, refused at once when no GPU is visible
                 cpu:  CPU with gloo (what CI and every test run)

On CUDA each rank binds GPU LOCAL_RANK before anything is allocated and the process
groups use NCCL; on CPU they use gloo. Nothing else in the code base picks a device:
tensors follow the model's parameters or the device handed down from here.
"""
from __future__ import annotations

import os

import torch

from model.config import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str) -> torch.device:
    if requested not in DEVICES:
        raise ConfigError(f"job.device={requested!r}: choose one of {', '.join(DEVICES)}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("job.device=cuda but torch sees no CUDA device (a CPU build of torch, "
                          "or CUDA_VISIBLE_DEVICES empty): install the CUDA build of torch or "
                          "use --job.device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) "
                          f"are visible on this node: launch at most {torch.cuda.device_count()} "
                          "ranks per node (torchrun --nproc-per-node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (step timing on CUDA measures kernels, not launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
