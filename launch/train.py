"""Entry point: `torchrun --nproc-per-node N -m launch.train --config configs/tiny.toml [--a.b v ...]`.

Exit codes: 0 done (or stopped cleanly on SIGTERM, resumable with --resume auto),
2 refused configuration or environment (the message says what to change).
"""
from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from launch.environment import check_environment
from launch.rank_logs import redirect_rank_output
from model.config import ConfigError
from trainer.config import load_config


def main(argv: list[str] | None = None, *, rank_logs: bool = False) -> int:
    argv = sys.argv[1:] if argv is None else argv
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(argv)
        cfg.validate(world_size=world_size)
        torch.set_num_threads(cfg.job.cpu_threads)
        if rank_logs:
            redirect_rank_output(cfg.job.run_dir, rank)
        summary = check_environment(world_size, rank)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(summary, flush=True)
    from trainer.train import StopRequest, train

    def request_stop(signum, frame):
        if StopRequest.requested:  # asked twice (or stuck): stop now
            raise SystemExit(128 + signum)
        StopRequest.requested = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    StopRequest.requested = False
    try:
        train(cfg, rank=rank)
    except ConfigError as e:  # found once state is read (e.g. a checkpoint of another model)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


@record
def cli() -> None:
    sys.exit(main(rank_logs=True))


if __name__ == "__main__":
    cli()
