"""Benchmark: our loader against mosaicml-streaming, like for like, on the same samples from
the same local S3 server (SeaweedFS, behind a counting proxy).

    python -m benchmarks.loader [--workers 2] [--rounds 3] [--seq-len 512]

The demo dataset (~1300 samples: photos, digits, text, short videos) is uploaded twice:
as our tar shards + indexes, and converted to MDS (one sample = its bytes from the tar and
its index entry), shards of ~1 MiB either way. Every pass reads every sample once.

    (a) raw sample I/O, in the main process
        ours        the blended, shuffled order + tiered reads (whole-shard GETs into the node
                    disk cache with read-ahead, then slices)
        streaming   StreamingDataset (shuffle on) handing back each sample's bytes
    (b) the same work on those samples with the same number of worker processes: plan the
        sample (geometry, token layout), tokenize its text, decode + crop + resize + jitter
        its media to uint8 patches, pack rows of seq_len tokens, 4 rows per batch
        ours        the loader (build_loader, data.workers = --workers)
        streaming   a StreamingDataset whose get_item does that work per sample (our same
                    functions), in a torch DataLoader with num_workers = --workers; rows are
                    packed in the main process

Each round runs every row cold (empty caches) then warm (the cache the cold pass left),
rows interleaved; the table shows medians over rounds: samples/s, MiB/s of sample bytes,
GETs per shard object (counted at the proxy), time to the first sample (a) or batch (b).
Then resume latency: build, restore a position at 90% of the pass, first batch.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
import zlib

import numpy as np
import torch

BATCH_ROWS = 4


def _import_streaming():
    """mosaicml-streaming's package __init__ imports its vision helpers (torchvision), and its
    base package imports two names from transformers for its DataLoader's type hints. Import
    the base package alone, with those two names stubbed when transformers is not installed
    (installing either would replace this machine's CPU torch: shared/FACTS.md)."""
    spec = importlib.util.find_spec("streaming")
    if spec is None:
        raise SystemExit("pip install --no-deps mosaicml-streaming==0.13.0 brotli python-snappy cramjam "
                         "zstd catalogue 'xxhash<4' to compare with it")
    if "streaming" not in sys.modules:
        pkg = types.ModuleType("streaming")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["streaming"] = pkg
    if importlib.util.find_spec("transformers") is None:
        stub = types.ModuleType("transformers")
        stub.__path__ = []
        for name, attr in (("feature_extraction_utils", "BatchFeature"), ("tokenization_utils_base", "BatchEncoding")):
            module = types.ModuleType(f"transformers.{name}")
            setattr(module, attr, dict)
            sys.modules[f"transformers.{name}"] = module
        sys.modules["transformers"] = stub
    from streaming.base import MDSWriter, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    return MDSWriter, StreamingDataset, clean_stale_shared_memory


def all_samples(data_dir: str):
    """(key, shard key, index entry JSON, the sample's bytes) of every sample, from the tars."""
    from dataloader.dataset import Dataset
    from dataloader.store import LocalStore
    from dataloader.tiered_reader import TieredReader

    ds = Dataset(TieredReader(LocalStore(data_dir), memory_bytes=1 << 30, disk=None, read_mode="shard"))
    for source in ds.sources:
        for shard in source.shards:
            blob = ds.reader.whole(shard.shard)
            for s in shard.samples:
                start, end = s.byte_span()
                yield f"{source.name}/{s.key}", shard.shard, json.dumps(s.to_json()), blob[start:end]


class SampleBytes:
    """Serves one sample's bytes (a span of its tar) where our Materializer expects a reader."""

    def __init__(self, blob: bytes, base: int):
        self.blob, self.base = blob, base

    def span(self, key: str, start: int, end: int) -> bytes:
        return self.blob[start - self.base:end - self.base]

    part = span


def sample_work(cfg, seed: int, tokenizer, key: str, shard: str, index_json: str, blob: bytes):
    """Our work on one sample from anywhere: plan, tokenize, decode. (length, tokens, labels, patches)."""
    from dataloader.materialize import Materializer, MediaRequest
    from dataloader.sample_plan import SampleRef, plan_sample
    from dataloader.shard_format import SampleIndex

    entry = SampleIndex.from_json(json.loads(index_json))
    uid = zlib.crc32(key.encode())
    plan = plan_sample(entry, SampleRef(uid, 0, 0, 0, 0, 0, uid), shard, cfg, seed)
    work = Materializer(SampleBytes(blob, entry.byte_span()[0]), tokenizer, cfg, seed)
    row = work.row([plan])
    patches = [p for m, mp in enumerate(plan.media)
               for p in work.media(MediaRequest(plan, m, list(range(len(mp.chunk_frames))),
                                                list(range(len(mp.chunk_frames))), True)).patches]
    return plan.length, row.tokens[:plan.length], row.labels[:plan.length], patches


def make_streaming_work(StreamingDataset, cfg, tokenizer_bytes: bytes):
    class StreamingWithWork(StreamingDataset):
        """StreamingDataset whose samples come out as our work's results."""

        def get_item(self, sample_id: int, retry: int = 7):
            from dataloader.template import TextTokenizer

            if not hasattr(self, "_tokenizer"):
                self._tokenizer = TextTokenizer(data=tokenizer_bytes)
            s = super().get_item(sample_id, retry)
            return sample_work(cfg, 0, self._tokenizer, s["key"], s["shard"], s["index"], s["sample"])

    return StreamingWithWork


def pack_rows(samples, seq_len: int):
    """Greedy packing of worked samples into rows (tokens, labels); yields batches of rows."""
    rows, tokens, labels, used = [], np.zeros(seq_len, np.int64), np.full(seq_len, -100, np.int64), 0
    for length, t, l, _ in samples:
        if used + length > seq_len:
            rows.append((torch.from_numpy(tokens), torch.from_numpy(labels)))
            tokens, labels, used = np.zeros(seq_len, np.int64), np.full(seq_len, -100, np.int64), 0
            if len(rows) == BATCH_ROWS:
                yield rows
                rows = []
        tokens[used:used + length], labels[used:used + length] = t, l
        used += length
    if rows:
        yield rows


# --- one pass of each row of the table ------------------------------------------------------

def ours_io(cfg, n: int):
    from dataloader.dataset import Dataset
    from dataloader.tiered_reader import make_reader
    from dataloader.sample_stream import Lane, SampleStream

    t0 = time.perf_counter()
    reader = make_reader(cfg)
    dataset = Dataset(reader)
    lane = Lane(SampleStream(dataset, cfg, seed=0, lanes=1), 0)
    reads: list = []  # (shard, start, end) in the order, from the index; planned 64 ahead, as the loader
    # plans a few steps ahead (not the whole pass before its first read)

    def plan(upto: int) -> None:
        while len(reads) < min(upto, n):
            r = lane.next_ref()
            entry = dataset.sample(r.source, r.shard, r.local)
            reads.append((dataset.shard_key(r.source, r.shard), *entry.byte_span()))

    first = None
    for i in range(n):
        if i % 32 == 0:  # the loader's read-ahead: shards of the next samples
            plan(i + 64)
            reader.prefetch(dict.fromkeys(key for key, _, _ in reads[i:i + 64]))
        reader.span(*reads[i])
        first = first or time.perf_counter() - t0
    reader.close()
    return time.perf_counter() - t0, first


def ours_full(cfg, n: int):
    from dataloader.loader import build_loader

    t0 = time.perf_counter()
    loader = build_loader(cfg, seed=0, dp_rank=0, dp_size=1, rows_per_step=BATCH_ROWS)
    first = None
    while sum(lane["stream"]["drawn"] for lane in loader.state_dict()["lanes"].values()) < n:
        next(loader)
        first = first or time.perf_counter() - t0
    elapsed = time.perf_counter() - t0
    state = loader.state_dict()
    loader.close()
    return elapsed, first, state


def streaming_io(StreamingDataset, remote: str, local: str):
    t0 = time.perf_counter()
    ds = StreamingDataset(remote=remote, local=local, shuffle=True, shuffle_seed=0, num_canonical_nodes=1,
                          batch_size=1, predownload=64, allow_unsafe_types=True)
    first = None
    for _ in ds:
        first = first or time.perf_counter() - t0
    return time.perf_counter() - t0, first


def streaming_full(dataset_cls, remote: str, local: str, workers: int, seq_len: int, state=None):
    from torch.utils.data import DataLoader

    t0 = time.perf_counter()
    ds = dataset_cls(remote=remote, local=local, shuffle=True, shuffle_seed=0, num_canonical_nodes=1,
                     batch_size=1, predownload=64, allow_unsafe_types=True)
    if state is not None:
        ds.load_state_dict(state)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False)
    first = None
    for _ in pack_rows(iter(loader), seq_len):
        first = first or time.perf_counter() - t0
        if state is not None:
            break
    return time.perf_counter() - t0, first


def main(argv=None) -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--samples-per-shard", type=int, default=256,
                   help="demo shard size; ~1 MiB like the MDS shards, so both make as many requests")
    a = p.parse_args(argv)

    from dataloader.config import LoaderConfig
    from launch.make_dataset import build
    from tests.dataloader.s3_server import ACCESS_KEY, SECRET_KEY, FaultProxy, start_seaweedfs

    MDSWriter, StreamingDataset, clean_shm = _import_streaming()
    work = tempfile.mkdtemp(prefix="k25-bench-loader-")
    data = os.path.join(work, "demo")
    build(data, samples_per_shard=a.samples_per_shard)
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION="us-east-1")
    server = start_seaweedfs(os.path.join(work, "seaweedfs"))
    proxy = FaultProxy(server.endpoint)
    proxy.server.handle_error = lambda request, address: None  # clients closing idle keep-alives
    os.environ["S3_ENDPOINT_URL"] = proxy.endpoint  # mosaicml-streaming's way to name an endpoint
    results: dict = {}
    try:
        server.upload_folder(data, "bench", "ours")
        samples = list(all_samples(data))
        n = len(samples)
        sample_bytes = sum(len(s[3]) for s in samples)
        mds = os.path.join(work, "mds")
        with MDSWriter(out=mds, columns={"key": "str", "shard": "str", "index": "str", "sample": "bytes"},
                       size_limit=1 << 20) as w:
            for key, shard, index, blob in samples:
                w.write({"key": key, "shard": shard, "index": index, "sample": blob})
        server.upload_folder(mds, "bench", "mds")
        ours_objects = sum(1 for _, _, fs in os.walk(data) for f in fs if f.endswith(".tar"))
        mds_objects = sum(1 for f in os.listdir(mds) if f.endswith(".mds"))
        tokenizer_bytes = open(os.path.join(data, "tokenizer.json"), "rb").read()

        def cfg_for(cache: str, workers: int) -> LoaderConfig:
            return LoaderConfig(uri="s3://bench/ours", s3_endpoint_url=proxy.endpoint, s3_region="us-east-1",
                                disk_cache_dir=cache, seq_len=a.seq_len, workers=workers,
                                requests_per_s=1000, max_concurrent_requests=16)

        streaming_work = make_streaming_work(StreamingDataset, cfg_for("", 0), tokenizer_bytes)
        resume: dict = {"ours": [], "streaming": []}
        failures: list[str] = []
        for r in range(a.rounds):
            caches = {name: os.path.join(work, f"cache-{r}-{name}") for name in ("oi", "of", "si", "sf")}
            for temp in ("cold", "warm"):
                rows = (
                    ("(a) I/O", "ours", ours_objects,
                     lambda: ours_io(cfg_for(caches["oi"], 0), n)),
                    ("(a) I/O", "streaming", mds_objects,
                     lambda: streaming_io(StreamingDataset, "s3://bench/mds", caches["si"])),
                    ("(b) work", "ours", ours_objects,
                     lambda: ours_full(cfg_for(caches["of"], a.workers), n)[:2]),
                    ("(b) work", "streaming", mds_objects,
                     lambda: streaming_full(streaming_work, "s3://bench/mds", caches["sf"], a.workers,
                                            a.seq_len)),
                )
                for part, who, objects, run in rows:
                    for attempt in range(3):  # mosaicml-streaming sometimes fails a cold pass here
                        clean_shm()
                        before = len(proxy.arrivals)
                        try:
                            elapsed, first = run()
                            break
                        except Exception as e:
                            if who != "streaming" or attempt == 2:
                                raise
                            failures.append(f"{part} {who} {temp}, round {r}: {type(e).__name__}: {e}")
                            if temp == "cold":
                                shutil.rmtree(caches["si" if part.startswith("(a)") else "sf"], ignore_errors=True)
                    gets = len(proxy.arrivals) - before
                    results.setdefault((part, who, temp), []).append((n / elapsed, gets / objects, first))
            # resume at 90% of a pass, warm caches: build, restore, first batch
            _, _, state = ours_full(cfg_for(caches["of"], a.workers), int(n * 0.9))
            from dataloader.loader import build_loader

            t0 = time.perf_counter()
            resumed = build_loader(cfg_for(caches["of"], a.workers), seed=0, dp_rank=0, dp_size=1,
                                   rows_per_step=BATCH_ROWS)
            resumed.load_state_dict(state)
            next(resumed)
            resume["ours"].append(time.perf_counter() - t0)
            resumed.close()
            clean_shm()
            late = {"epoch": 0, "sample_in_epoch": int(n * 0.9), "num_canonical_nodes": 1, "shuffle_seed": 0,
                    "initial_physical_nodes": None}
            resume["streaming"].append(streaming_full(streaming_work, "s3://bench/mds", caches["sf"],
                                                      a.workers, a.seq_len, state=late)[0])
    finally:
        proxy.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    print(f"\n{n} samples, {sample_bytes / 2**20:.1f} MiB of sample bytes, SeaweedFS on 127.0.0.1 behind a "
          f"counting proxy; {ours_objects} tar shards (+ indexes) vs {mds_objects} MDS shards; "
          f"(b) with {a.workers} worker processes each, rows of {a.seq_len} tokens, {BATCH_ROWS} rows a batch; "
          f"medians of {a.rounds} interleaved rounds\n")
    print(f"{'part':<10}{'loader':<11}{'cache':<7}{'samples/s':>10}{'MiB/s':>8}{'GETs/shard':>12}"
          f"{'first (s)':>11}{'ours/streaming':>16}")
    for (part, who, temp), runs in results.items():
        sps = med(x[0] for x in runs)
        other = med(x[0] for x in results[(part, "streaming", temp)])
        ratio = f"{sps / other:.2f}x" if who == "ours" else ""
        print(f"{part:<10}{who:<11}{temp:<7}{sps:>10.0f}{sps * sample_bytes / n / 2**20:>8.1f}"
              f"{med(x[1] for x in runs):>12.2f}{med(x[2] for x in runs):>11.3f}{ratio:>16}")
    print(f"\nresume at 90% of a pass (build + restore + first batch of (b)): ours {med(resume['ours']):.3f} s, "
          f"streaming {med(resume['streaming']):.3f} s")
    for failure in failures:
        print(f"streaming pass failed and was rerun: {failure}")


if __name__ == "__main__":
    main()
