"""Benchmark: our loader against mosaicml-streaming on the same data from the same local
S3 server (SeaweedFS, through a counting proxy).

    python -m benchmarks.loader [--data DIR] [--samples N] [--resume-step K]

Both read every sample of the demo dataset once (one pass) from s3://, first with an
empty cache (cold), then again with the cache the first pass left (warm). Rows:

    ours (I/O)     the blended, shuffled global order + tiered reads (whole-shard GETs
                   into the node disk cache, then slices): the part comparable to
                   streaming, which hands back raw samples
    ours (full)    the whole loader: + decode, augmentation, tokenization, packing into
                   512-token rows (samples/s counts samples packed)
    streaming      StreamingDataset over the same samples converted to MDS (raw member
                   bytes in a pickled dict per sample), shuffle on, its own local cache

Columns: samples/s and MiB/s of sample bytes, S3 requests per sample (counted at the
proxy), time to the first sample/batch, and the time to resume at a late position
(build a fresh reader, load the state, get the first sample).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import shutil
import sys
import tempfile
import time
import types

import torch


def _import_streaming():
    """mosaicml-streaming's package __init__ imports its vision/multimodal helpers, which
    need torchvision; its core (streaming.base) does not. Import the core alone."""
    spec = importlib.util.find_spec("streaming")
    if spec is None:
        raise SystemExit("pip install mosaicml-streaming==0.13.0 to compare with it")
    if "streaming" not in sys.modules:
        pkg = types.ModuleType("streaming")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["streaming"] = pkg
    from streaming.base import MDSWriter, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    return MDSWriter, StreamingDataset, clean_stale_shared_memory


def _all_samples(data_dir: str):
    """(key, members dict, bytes) of every sample, read straight from the tar shards."""
    from dataloader.dataset import Dataset
    from dataloader.store import LocalStore
    from dataloader.tiered_reader import TieredReader

    ds = Dataset(TieredReader(LocalStore(data_dir), memory_bytes=1 << 30, disk=None, read_mode="shard"))
    for si, source in enumerate(ds.sources):
        for shard in source.shards:
            blob = ds.reader.whole(shard.shard)
            for s in shard.samples:
                yield f"{source.name}/{s.key}", {m: blob[o:o + n] for m, (o, n) in s.members.items()}


def run_ours_io(cfg, n: int):
    from dataloader.loader import make_reader
    from dataloader.dataset import Dataset
    from dataloader.sample_stream import SampleStream

    t0 = time.perf_counter()
    reader = make_reader(cfg)
    ds = Dataset(reader)
    stream = SampleStream(ds, cfg, seed=0)
    plans = [stream.next() for _ in range(n)]  # metadata only
    first = None
    nbytes = 0
    for i, plan in enumerate(plans):
        if i % 32 == 0:  # the same read-ahead the loader does: shards of the next samples
            reader.prefetch(dict.fromkeys(p.shard_key for p in plans[i:i + 64]))
        nbytes += len(reader.span(plan.shard_key, *plan.span))
        if first is None:
            first = time.perf_counter() - t0
    return time.perf_counter() - t0, first, nbytes, stream


def run_ours_full(cfg, n: int):
    from dataloader.loader import build_loader

    t0 = time.perf_counter()
    loader = build_loader(cfg, seed=0, dp_rank=0, dp_size=1, rows_per_step=4)
    first = None
    while loader.state_dict()["stream"]["next_g"] < n:
        next(loader)
        if first is None:
            first = time.perf_counter() - t0
    elapsed = time.perf_counter() - t0
    state = loader.state_dict()
    loader.close()
    return elapsed, first, state


def main(argv=None) -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="", help="dataset folder (default: build the demo)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=256,
                   help="demo shard size; ~1 MiB like the MDS shards, so both make as many requests")
    a = p.parse_args(argv)

    from dataloader.config import LoaderConfig
    from tests.dataloader.s3_server import ACCESS_KEY, SECRET_KEY, FaultProxy, start_seaweedfs

    work = tempfile.mkdtemp(prefix="k25-bench-loader-")
    data = a.data
    if not data:
        from launch.make_dataset import build

        data = os.path.join(work, "demo")
        build(data, samples_per_shard=a.samples_per_shard)
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION="us-east-1")
    server = start_seaweedfs(os.path.join(work, "seaweedfs"))
    proxy = FaultProxy(server.endpoint)
    rows = []
    try:
        server.upload_folder(data, "bench", "ours")
        samples = list(_all_samples(data))
        shards = sum(1 for r, _, fs in os.walk(data) for f in fs if f.endswith(".tar"))
        n = len(samples)
        MDSWriter, StreamingDataset, clean_shm = _import_streaming()
        mds_dir = os.path.join(work, "mds")
        with MDSWriter(out=mds_dir, columns={"key": "str", "members": "pkl"}, size_limit=1 << 20) as w:
            for key, members in samples:
                w.write({"key": key, "members": members})
        server.upload_folder(mds_dir, "bench", "mds")

        def counted(fn):
            before = len(proxy.arrivals)
            out = fn()
            return out, len(proxy.arrivals) - before

        for label, read_mode in (("ours (I/O)", "shard"), ("ours (full)", "shard")):
            cache = os.path.join(work, f"cache-{label[6:9]}")
            cfg = LoaderConfig(uri="s3://bench/ours", s3_endpoint_url=proxy.endpoint, s3_region="us-east-1",
                               disk_cache_dir=cache, seq_len=512, workers=a.workers, read_mode=read_mode,
                               requests_per_s=1000, max_concurrent_requests=16)
            for temp in ("cold", "warm"):
                if label == "ours (I/O)":
                    (elapsed, first, nbytes, _), reqs = counted(lambda: run_ours_io(cfg, n))
                else:
                    (elapsed, first, state), reqs = counted(lambda: run_ours_full(cfg, n))
                    nbytes = sum(sum(len(v) for v in m.values()) for _, m in samples)
                rows.append((label, temp, n / elapsed, nbytes / elapsed / 2**20, reqs / n, first))
            if label == "ours (full)":
                from dataloader.loader import build_loader

                t0 = time.perf_counter()
                resumed = build_loader(cfg, seed=0, dp_rank=0, dp_size=1, rows_per_step=4)
                resumed.load_state_dict(state)
                next(resumed)
                ours_resume = time.perf_counter() - t0
                resumed.close()

        os.environ["S3_ENDPOINT_URL"] = proxy.endpoint
        local = os.path.join(work, "mds-cache")
        for temp in ("cold", "warm"):
            clean_shm()

            def one_pass():
                t0 = time.perf_counter()
                ds = StreamingDataset(remote="s3://bench/mds", local=local, shuffle=True, shuffle_seed=0, num_canonical_nodes=1,
                                      batch_size=1, predownload=64,
                                      allow_unsafe_types=True)  # our own pickles
                first, nbytes = None, 0
                for sample in ds:
                    nbytes += sum(len(v) for v in sample["members"].values())
                    if first is None:
                        first = time.perf_counter() - t0
                return time.perf_counter() - t0, first, nbytes

            (elapsed, first, nbytes), reqs = counted(one_pass)
            rows.append(("streaming", temp, n / elapsed, nbytes / elapsed / 2**20, reqs / n, first))
        clean_shm()
        late = int(n * 0.9)
        t0 = time.perf_counter()
        ds = StreamingDataset(remote="s3://bench/mds", local=local, shuffle=True, shuffle_seed=0, num_canonical_nodes=1, batch_size=1,
                              allow_unsafe_types=True)
        ds.load_state_dict({"epoch": 0, "sample_in_epoch": late, "num_canonical_nodes": 1,
                            "shuffle_seed": 0, "initial_physical_nodes": None})
        next(iter(ds))
        streaming_resume = time.perf_counter() - t0
    finally:
        proxy.stop()
        server.stop()

    print(f"\n{n} samples, {sum(sum(len(v) for v in m.values()) for _, m in samples) / 2**20:.1f} MiB of "
          f"sample bytes, SeaweedFS on 127.0.0.1 behind a counting proxy, {a.workers} loader workers; "
          f"{len([f for f in os.listdir(mds_dir) if f.endswith('.mds')])} MDS shards, "
          f"{shards} tar shards + {shards} indexes\n")
    print(f"{'loader':<14}{'cache':<7}{'samples/s':>11}{'MiB/s':>9}{'req/sample':>12}{'first (s)':>11}")
    for label, temp, sps, mibs, rps, first in rows:
        print(f"{label:<14}{temp:<7}{sps:>11.0f}{mibs:>9.1f}{rps:>12.3f}{first:>11.3f}")
    print(f"\nresume at a late position (build + restore + first item): ours (full) {ours_resume:.3f} s, "
          f"streaming {streaming_resume:.3f} s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
