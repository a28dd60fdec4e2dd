"""Benchmark: bytes decoded and bytes moved between ranks per step under DEP, before and after
each rank fetched only its own media.

    python -m benchmarks.dep_data [--pp 2] [--dp 2] [--steps 4] [--data data/demo]

Every rank of a pp x dp job is simulated in this process with the loader set up as the
trainer sets it up for DEP (its DEP group's rows planned from the index, the items the
DEP plan assigns to it decoded); what each loader decoded is measured. The old data path
is computed from the same plans by its rules:

    before  every pipeline stage of a replica decoded all of the replica's media, as float32
            patches (4 bytes a value); the owners (stage 0) then sent each item's patches to
            its encoder rank when that was another rank, and gathered the media metadata of
            the whole job with all_gather_object every step
    after   each item is decoded once, by its encoder rank, to uint8 patches (1 byte a value);
            no pixels move; embeddings go to the owners and their gradients come back, as
            before (fp32 here: --hidden x 4 bytes per merged token, each way)

Bytes are deterministic (no timing): one run, averages per step over --steps steps.
"""
from __future__ import annotations

import argparse
import pickle

PATCH_VALUES = 3 * 14 * 14


def main(argv=None) -> None:
    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/demo")
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8, help="rows per step over all replicas")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64, help="LM hidden size (tiny: 64; K2.5: 7168)")
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args(argv)

    from dataloader.config import LoaderConfig
    from dataloader.loader import build_loader
    from parallel.dep_plan import MediaRef, plan_media

    cfg = LoaderConfig(uri=a.data, seq_len=a.seq_len)
    rows = a.global_batch // a.dp
    world = a.pp * a.dp
    owners = list(range(a.dp))  # rank = stage * dp + replica: stage-0 ranks come first

    def refs_of(items):
        return [MediaRef(m.item_id, r, m.row // a.micro_batch, m.num_patches, m.num_tokens) for r, m in items]

    def selector(rank):
        return lambda step, items: [m.item_id for m in
                                    plan_media(refs_of(items), world, owners).items_encoded_by(rank)]

    loaders = [build_loader(cfg, seed=0, dp_rank=rank % a.dp, dp_size=a.dp, rows_per_step=rows,
                            plan_replicas=range(a.dp), decode=selector(rank)) for rank in range(world)]
    totals = {k: 0.0 for k in ("items", "before_decoded", "before_pixels_moved", "before_meta",
                               "after_decoded", "after_max_rank", "embeddings")}
    for _ in range(a.steps):
        batches = [next(loader) for loader in loaders]
        group = batches[0].group
        plan = plan_media(refs_of(group.items), world, owners)
        by_id = {m.item_id: m for _, m in group.items}
        patches = {i: by_id[i].num_patches for i in by_id}
        totals["items"] += len(by_id)
        totals["before_decoded"] += a.pp * 4 * PATCH_VALUES * sum(patches.values())
        totals["before_pixels_moved"] += 4 * PATCH_VALUES * sum(
            patches[ref.item_id] for ref, enc, own in zip(plan.items, plan.encoder_rank, plan.owner_rank)
            if enc != own)
        for replica in range(a.dp):  # each owner's (refs, grids), all_gather_object'ed to every rank
            mine = [ref for ref in plan.items if ref.replica == replica]
            totals["before_meta"] += world * len(pickle.dumps((mine, {r.item_id: by_id[r.item_id].grid_thw
                                                                      for r in mine})))
        decoded = [sum(p.numel() * p.element_size() for p in b.group.pixels.values()) for b in batches]
        totals["after_decoded"] += sum(decoded)
        totals["after_max_rank"] += max(decoded)
        totals["embeddings"] += 2 * 4 * a.hidden * sum(
            ref.num_tokens for ref, enc, own in zip(plan.items, plan.encoder_rank, plan.owner_rank) if enc != own)
        assert sorted(i for b in batches for i in b.group.pixels) == sorted(by_id), "each item decoded once"
    for loader in loaders:
        loader.close()
    per = {k: v / a.steps for k, v in totals.items()}
    kib = lambda x: f"{x / 1024:,.0f}"
    print(f"\nDEP data path per step: pp={a.pp} dp={a.dp} ({world} ranks), {a.global_batch} rows x {a.seq_len} "
          f"tokens, {per['items']:.1f} media items a step (mean of {a.steps} steps), data {a.data}; KiB\n")
    print(f"{'':<8}{'decoded (all ranks)':>21}{'pixels between ranks':>22}{'embeddings + grads':>20}"
          f"{'metadata gathered':>19}")
    print(f"{'before':<8}{kib(per['before_decoded']):>21}{kib(per['before_pixels_moved']):>22}"
          f"{kib(per['embeddings']):>20}{kib(per['before_meta']):>19}")
    print(f"{'after':<8}{kib(per['after_decoded']):>21}{'0':>22}{kib(per['embeddings']):>20}{'0':>19}")
    print(f"\nafter: the busiest rank decoded {kib(per['after_max_rank'])} KiB a step; before, every rank of "
          f"stage s decoded its whole replica's media ({kib(per['before_decoded'] / world)} KiB a rank on "
          f"average). Metadata before: pickled refs and grids, all_gather_object'ed to every rank.")


if __name__ == "__main__":
    main()
