"""Worker: run one step per layout and record what each rank holds (tests/trainer/memory_probe.py).

Layouts are given as in equivalence_worker.py (`pp=2,vpp=2,ep=2,dp=2`, `layout=...`,
`encoder=...`), plus `wide=1` for the wider model of test_planner_memory.py, `media=0`
for text-only data and `data=demo` for the dataset `--dataset` (the streaming loader: uint8
pixels) instead of synthetic data. Rank 0 saves {layout: [per-rank figures]}.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from tests.distributed.equivalence_worker import job_config
from tests.trainer.memory_probe import finish_distributed, probe_distributed
from trainer.train import DistributedEngine, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", required=True, help="';'-separated layouts")
    parser.add_argument("--base", default="", help="config overrides shared by all layouts")
    parser.add_argument("--wide", default="", help="overrides of the wider model")
    parser.add_argument("--dataset", default="", help="overrides of the data=demo layouts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for text in args.layouts.split(";"):
        layout = dict(item.split("=") for item in text.split(","))
        base = args.base.split() + (args.wide.split() if layout.get("wide") == "1" else [])
        if layout.get("media") == "0":
            base += ["--data.media_per_seq", "0"]
        if layout.get("data") == "demo":
            base += args.dataset.split()
        cfg = job_config(base, layout)
        cfg.job.run_dir = os.path.join(os.path.dirname(args.out), text.replace(",", "_"))
        engine = DistributedEngine(cfg)
        out = probe_distributed(engine)
        train(cfg, rank=dist.get_rank(), engine=engine)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, finish_distributed(engine, out))
        results[text] = gathered
        engine.topology.destroy()
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
