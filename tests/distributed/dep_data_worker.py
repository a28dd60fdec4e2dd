"""Worker: what each rank's loader decodes under DEP and colocated, on a real dataset.

For each layout, trains `--steps` steps of the tiny model on the dataset `--data` and
records per rank and step: the item ids its loader decoded, the item ids the DEP plan
gave it (DEP), every item id of its replica's rows, its pipeline stage, and the bytes
its loader decoded. Rank 0 writes {layout: [per rank: [per step: record]]} as JSON.

`--forge-rank R` builds rank R's data source with another seed (a rank whose data
diverged): the DEP digest check must stop the job, naming both digests.

A layout may name a mutant the test must catch:
  mutant=decode_all   every rank decodes every item of its DEP group, not only its own
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from tests.distributed.equivalence_worker import job_config
from trainer.data import DataRole, build_data
from trainer.lr_schedule import learning_rate
from trainer.train import DistributedEngine


def role_of(engine: DistributedEngine, mutant: str) -> DataRole:
    role = engine.data_role()
    if mutant == "decode_all":
        role.decode = lambda step, items: [m.item_id for _, m in items]
    elif mutant:
        raise ValueError(f"unknown mutant {mutant!r}")
    return role


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", required=True)
    parser.add_argument("--base", default="")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--forge-rank", type=int, default=-1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for text in args.layouts.split(";"):
        layout = dict(item.split("=") for item in text.split(","))
        cfg = job_config(args.base.split(), layout)
        engine = DistributedEngine(cfg)
        if dist.get_rank() == args.forge_rank:
            cfg.train.seed += 1  # this rank's loader only: the model was built with the real seed
        data = build_data(cfg, role_of(engine, layout.get("mutant", "")))
        loader = data.loader
        records = []
        for step in range(args.steps):
            batch = data.next_batch()
            engine.step(batch, learning_rate(step, cfg.optim, args.steps))
            dep = engine.engine.dep
            records.append({
                "stage": engine.topology.pp_rank,
                "replica": engine.topology.dp_rank,
                "decoded": sorted(loader.last_step_decoded),
                "assigned": (sorted(m.item_id for m in dep.plan.items_encoded_by(dep.rank))
                             if dep is not None else None),
                "own_items": sorted(m.item_id for m in batch.media),
                "group_items": sorted(m.item_id for _, m in batch.group.items) if batch.group else None,
                "pixel_bytes": sum(p.numel() for p in batch.group.pixels.values()) if batch.group else
                sum(m.patches.numel() for m in batch.media if m.patches is not None),
                "embedding_bytes_sent": engine.stats.get("dep_embedding_bytes_sent", 0.0),
            })
        data.close()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, records)
        results[text] = gathered
        engine.topology.destroy()
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
