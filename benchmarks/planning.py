"""Benchmark: per-step planning time on one rank vs the number of data-parallel replicas.

    python -m benchmarks.planning [--data data/demo] [--dp 1,16,256,4096] [--rounds 3]

One rank of a simulated job: `rows` rows of `seq_len` tokens per replica (defaults: 4 rows
of 4096 tokens, so 4096 replicas make 16k rows, about the global batch of the K2 recipe),
pp pipeline stages. Planning is what a rank does from the dataset index before reading a
byte: draw samples, plan them (geometry, token layout), pack rows, lay out media items
and, under DEP, build the DEP plan (integer LPT) of its group. Variants:

    before                the old loader: one packer over one global stream packs all
                          dp x rows rows of the step on every rank, then keeps its slice
    before + DEP plan     + the DEP plan over every media item of the global batch (the old
                          DEP also all_gathered that metadata every step: not counted here)
    lanes                 this rank packs its replica's lanes only (any stage, colocated, text)
    lanes + DEP (8)       + the lanes of its DEP group (parallel.dep_group_replicas = 8, the
                          default) and the DEP plan over the group's media
    lanes + DEP (all)     DEP group = every replica (dep_group_replicas = 0): grows with dp

Variants and dp values are interleaved in every round; the table shows the median of
the rounds in ms per step (a cell slower than --max-s per step is measured once). Cells
whose rank would pack more than --max-rows rows per step are not run ("-"): they grow
linearly from the last one measured, and their buffers alone (pack_buffer sample plans
per lane) would not fit this machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

ROWS_DEFAULT = 4


def make_refs(items, micro_batch: int):
    from parallel.dep_plan import MediaRef

    return [MediaRef(m.item_id, replica, m.row // micro_batch, m.num_patches, m.num_tokens)
            for replica, m in items]


def dep_plan(items, replicas: int, pp: int):
    """The DEP plan as the trainer builds it: group ranks are pp x replicas, stage 0 first."""
    from parallel.dep_plan import plan_media

    return plan_media(make_refs(items, 1), replicas * pp, list(range(replicas)))


class Before:
    """The old per-step planning: one stream, one packer, all rows of the step."""

    def __init__(self, cfg, dp: int, rows: int, pp: int, with_dep: bool):
        from dataloader.dataset import Dataset
        from dataloader.tiered_reader import make_reader
        from dataloader.packer import Packer
        from dataloader.sample_stream import Lane, SampleStream

        stream = SampleStream(Dataset(make_reader(cfg)), cfg, seed=0, lanes=1)
        self.packer = Packer(cfg.seq_len, cfg.pack_buffer, cfg.max_media_per_row, Lane(stream, 0).next)
        self.dp, self.rows, self.pp, self.with_dep = dp, rows, pp, with_dep

    def plan_step(self) -> None:
        from dataloader.batch import MediaItem
        from dataloader.row_layout import row_items

        global_rows = [self.packer.next_row() for _ in range(self.dp * self.rows)]
        if self.with_dep:
            items = [(j // self.rows, MediaItem(it.item_id, it.grid_thw, j % self.rows, it.offset))
                     for j, row in enumerate(global_rows) for it in row_items(row)]
            dep_plan(items, self.dp, self.pp)


class Lanes:
    """The loader's planning of one step, as the trainer sets it up for one rank."""

    def __init__(self, cfg, dp: int, rows: int, pp: int, group: int | None):
        from dataloader.loader import build_loader

        replicas = range(min(dp, group or dp)) if group is not None else ()
        decode = "none" if group is None else (
            lambda step, items: [m.item_id for m in dep_plan(items, len(replicas), pp).items_encoded_by(0)])
        self.loader = build_loader(cfg, seed=0, dp_rank=0, dp_size=dp, rows_per_step=rows,
                                   plan_replicas=replicas, decode=decode)

    def plan_step(self) -> None:
        self.loader._plan_step()
        self.loader._pending.clear()


def planned_rows(name: str, dp: int, rows: int) -> int:
    """Rows one rank packs per step under each variant."""
    if name.startswith("before") or name.endswith("(all)"):
        return dp * rows
    return rows * (min(dp, 8) if name.endswith("(8)") else 1)


VARIANTS = {
    "before": lambda cfg, dp, rows, pp: Before(cfg, dp, rows, pp, with_dep=False),
    "before + DEP plan": lambda cfg, dp, rows, pp: Before(cfg, dp, rows, pp, with_dep=True),
    "lanes": lambda cfg, dp, rows, pp: Lanes(cfg, dp, rows, pp, group=None),
    "lanes + DEP (8)": lambda cfg, dp, rows, pp: Lanes(cfg, dp, rows, pp, group=8),
    "lanes + DEP (all)": lambda cfg, dp, rows, pp: Lanes(cfg, dp, rows, pp, group=0),
}


def main(argv=None) -> None:
    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/demo")
    p.add_argument("--dp", default="1,16,256,4096")
    p.add_argument("--rows", type=int, default=ROWS_DEFAULT, help="rows per replica per step")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--pp", type=int, default=16, help="pipeline stages (ranks per replica in a DEP group)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per cell first (fills buffers)")
    p.add_argument("--max-s", type=float, default=20.0)
    p.add_argument("--max-rows", type=int, default=1024)
    p.add_argument("--variants", default=",".join(VARIANTS))
    a = p.parse_args(argv)

    from dataloader.config import LoaderConfig

    cfg = LoaderConfig(uri=a.data, seq_len=a.seq_len)
    dps = [int(x) for x in a.dp.split(",")]
    names = a.variants.split(",")
    cells = {(name, dp): VARIANTS[name](cfg, dp, a.rows, a.pp) for name in names for dp in dps
             if planned_rows(name, dp, a.rows) <= a.max_rows}
    times: dict = {key: [] for key in cells}
    for key, cell in cells.items():
        for _ in range(a.warmup if key[1] * a.rows < 4096 else 1):
            cell.plan_step()
    for _ in range(a.rounds):
        for dp in dps:
            for name in names:
                key = (name, dp)
                if key not in cells or times[key] and times[key][-1] > a.max_s:
                    continue  # too slow to repeat: one measurement stands
                t0 = time.perf_counter()
                cells[key].plan_step()
                times[key].append(time.perf_counter() - t0)
    print(f"\nplanning time per step on one rank (ms, median of {a.rounds} interleaved rounds), "
          f"{a.rows} rows x {a.seq_len} tokens per replica, pp={a.pp}, data {a.data}\n")
    print(f"{'variant':<20}" + "".join(f"{'dp=' + str(dp):>12}" for dp in dps))
    for name in names:
        cells_ms = []
        for dp in dps:
            t = times.get((name, dp))
            if not t:
                cells_ms.append(f"{'-':>11} ")
                continue
            mark = "*" if len(t) < a.rounds else ""
            cells_ms.append(f"{statistics.median(t) * 1e3:>11.1f}{mark or ' '}")
        print(f"{name:<20}" + "".join(cells_ms))
    print(f"\n* measured fewer than {a.rounds} times (over {a.max_s:.0f} s per step); "
          f"- not run (more than {a.max_rows} rows per step on one rank)")


if __name__ == "__main__":
    main()
