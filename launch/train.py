"""Entry point: `torchrun --nproc-per-node N -m launch.train --config configs/tiny.toml [--a.b v ...]`.

`python -m launch.train --help` lists every config key with its type, default and documentation.

Start-up order (a refused job writes nothing into the run directory):

    config + environment checks ─► rank 0: lock run_dir ─► join the process group
        (the other ranks wait there for rank 0) ─► per-rank logs ─► train

Exit codes of a rank: 0 done, or stopped cleanly on SIGTERM / SIGINT / loss of the torchrun
agent (checkpointed, resumable with --resume auto); 1 a failure (e.g. the disk filled up
while checkpointing); 2 refused configuration, environment, data or checkpoint (the
message says what to change); 124 the progress watchdog found no progress for
job.step_timeout_s (trainer/watchdog.py).
"""
from __future__ import annotations

import os
import signal
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from launch.agent_watch import watch_agent
from launch.environment import check_environment
from launch.rank_logs import redirect_rank_output
from model.config import ConfigError
from trainer.config import help_text, load_config


def main(argv: list[str] | None = None, *, rank_logs: bool = False) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(argv)
        cfg.validate(world_size=world_size)
        torch.set_num_threads(cfg.job.cpu_threads)
        summary = check_environment(world_size, rank)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from trainer.checkpoint import CheckpointWriteError
    from trainer.run_dir_lock import run_dir_lock
    from trainer.train import StopRequest, train
    from trainer.watchdog import Watchdog

    def request_stop(signum, frame):
        if StopRequest.requested:  # asked twice (or stuck): stop now
            raise SystemExit(128 + signum)
        StopRequest.requested = True

    def agent_lost(pid: int) -> None:
        print(f"rank {rank}: the torchrun agent (pid {pid}) is gone; stopping after this "
              "step with a checkpoint, as on SIGTERM", file=sys.stderr, flush=True)
        StopRequest.requested = True

    StopRequest.requested = False
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    watchdog = Watchdog(cfg.job.step_timeout_s, rank, world_size)
    try:
        with run_dir_lock(cfg.job.run_dir) if rank == 0 else nullcontext():
            if world_size > 1:
                from parallel.topology import init_distributed

                watchdog.attach_store(init_distributed(
                    "gloo", timeout_s=cfg.job.collective_timeout_s))
            if rank_logs:
                redirect_rank_output(cfg.job.run_dir, rank)
            watch_agent(agent_lost)
            if rank == 0:
                print(summary, flush=True)
            train(cfg, rank=rank, progress=watchdog.progress)
    except ConfigError as e:  # also found once state is read (a checkpoint of another model)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        watchdog.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


@record
def cli() -> None:
    sys.exit(main(rank_logs=True))


if __name__ == "__main__":
    cli()
