"""Start-up checks of the machine and the launch, with messages that say what to change."""
from __future__ import annotations

import os

import torch

from model.config import ConfigError


def check_environment(world_size: int, rank: int) -> str:
    """Refuse launches that cannot work; return a one-line summary of the environment."""
    env = os.environ
    if world_size > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK") if k not in env]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world_size} but {', '.join(missing)} are not set: "
                              "launch with torchrun (see README, 'Multi-node')")
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
    nodes = max(1, world_size // local_world)
    cores = os.cpu_count() or 1
    threads = torch.get_num_threads()
    cuda = "none"
    if torch.cuda.is_available():
        cuda = (f"{torch.cuda.device_count()} visible (CUDA_VISIBLE_DEVICES="
                f"{env.get('CUDA_VISIBLE_DEVICES', 'all')}); this version trains on CPU with gloo")
    summary = (f"environment: {world_size} rank(s) on {nodes} node(s), backend gloo, "
               f"{threads} thread(s) per rank x {local_world} local rank(s) on {cores} cores, "
               f"CUDA: {cuda}")
    if threads * local_world > cores and rank == 0:
        if threads > 1:  # the threads per rank come from job.cpu_threads (launch.train sets them)
            summary += (f"\nwarning: {local_world} local rank(s) x {threads} threads "
                        f"(job.cpu_threads) = {threads * local_world} threads on {cores} cores "
                        "oversubscribe the CPU; lower job.cpu_threads (1 is the default)")
        else:
            summary += (f"\nwarning: {local_world} ranks on {cores} cores, 1 thread each: more "
                        "ranks than cores, so they take turns and every step waits for the "
                        f"slowest; fine for tests, for speed start at most {cores} ranks per "
                        "node (--nproc-per-node)")
    return summary
