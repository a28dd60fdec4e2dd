"""The S3 path against a real S3-compatible server (SeaweedFS), with and without faults."""
from __future__ import annotations

from collections import Counter

import pytest

from dataloader.loader import build_loader
from dataloader.request_budget import RequestBudget
from dataloader.store import MissingObject, StoreError
from tests.dataloader.helpers import assert_same_rows, take_rows, tiny_config
from tests.dataloader.s3_server import FaultProxy

STEPS = 6


@pytest.fixture(scope="module")
def local_rows(demo_dir):
    return take_rows(build_loader(tiny_config(demo_dir), seed=4, dp_rank=0, dp_size=1, rows_per_step=2), STEPS)


def s3_config(uri, endpoint, cache, **kw):
    return tiny_config(uri, s3_endpoint_url=endpoint, s3_region="us-east-1", disk_cache_dir=str(cache), **kw)


def test_same_stream_as_local_and_warm_cache_asks_only_if_the_manifest_changed(
        s3_dataset, local_rows, tmp_path):
    server, uri = s3_dataset
    proxy = FaultProxy(server.endpoint)  # no faults: only counts requests
    try:
        cfg = s3_config(uri, proxy.endpoint, tmp_path / "cache")
        cold = build_loader(cfg, seed=4, dp_rank=0, dp_size=1, rows_per_step=2)
        assert_same_rows(take_rows(cold, STEPS), local_rows)
        objects = 2 + 2 * sum(len(s.shards) for s in cold.dataset.sources)  # manifest, tokenizer, tars, indexes
        assert 0 < len(proxy.arrivals) <= objects, "at most one request per object per node"
        before = len(proxy.arrivals)
        warm = build_loader(cfg, seed=4, dp_rank=0, dp_size=1, rows_per_step=2)
        assert_same_rows(take_rows(warm, STEPS), local_rows)
        # a warm disk cache asks one thing: is dataset.json unchanged? (304 Not Modified)
        assert len(proxy.arrivals) == before + 1 and proxy.statuses[-1] == 304
    finally:
        proxy.stop()


def test_range_reads_with_workers_match_local(s3_dataset, local_rows, tmp_path):
    server, uri = s3_dataset
    cfg = s3_config(uri, server.endpoint, tmp_path / "cache", read_mode="range", workers=2,
                    worker_start_method="spawn")
    loader = build_loader(cfg, seed=4, dp_rank=0, dp_size=1, rows_per_step=2)
    assert_same_rows(take_rows(loader, STEPS), local_rows)
    loader.close()


@pytest.mark.parametrize("path", [
    pytest.param(dict(read_mode="range"), id="range-reads-no-workers"),
    pytest.param(dict(read_mode="shard", workers=2),  # the default start method (forkserver)
                 id="default-path-shard-reads-disk-cache-read-ahead-2-workers"),
])
def test_faults_give_the_same_stream_and_every_request_takes_a_budget_token(
        s3_dataset, local_rows, tmp_path, path):
    """20% injected 503 SlowDown and 5% connection resets: the same stream, complete.

    Checked by counts, which cannot flake (the pacing itself, a timing property, is
    measured by benchmarks/request_budget.py): faults of both kinds were injected (and
    survived, so retried); every request the store saw took a token of the node's budget,
    whichever process, read-ahead thread or retry sent it (a token may go unused by a request
    that close() stopped in flight: bounded, not equal); and in shard mode, with two
    worker processes and the read-ahead threads racing for the same shards, no object
    reached the node twice (disk cache + fetch locks)."""
    server, uri = s3_dataset
    proxy = FaultProxy(server.endpoint, p503=0.2, p_reset=0.05, seed=1)
    try:
        cfg = s3_config(uri, proxy.endpoint, tmp_path / "cache", requests_per_s=100.0,
                        max_concurrent_requests=2, retry_base_s=0.01, retry_max_s=0.1,
                        max_retries=20, **path)
        loader = build_loader(cfg, seed=4, dp_rank=0, dp_size=1, rows_per_step=2)
        try:
            assert_same_rows(take_rows(loader, STEPS), local_rows)
            assert not loader.skipped_keys
        finally:
            loader.close()
        assert proxy.injected_503 > 0 and proxy.injected_resets > 0
        budget = RequestBudget(str(tmp_path / "cache" / "budget"), cfg.requests_per_s, 1)
        # Every request the store saw took a token; a token may also go to a request the store
        # never saw: one in flight when close() stopped the workers (at most max_concurrent,
        # the node's slots), or one sent on a pooled connection the proxy had reset.
        seen, granted = len(proxy.requests), budget.granted()
        assert seen <= granted, f"{seen - granted} request(s) bypassed the node budget"
        assert granted <= seen + cfg.max_concurrent_requests + proxy.injected_resets, \
            f"{granted} tokens for {seen} requests: a request took more than one token"
        answered = Counter(r.outcome for r in proxy.requests if "injected" not in r.outcome)
        assert set(answered) <= {"200", "206", "304"}, answered  # 304: manifest revalidated
        assert sum(answered.values()) + proxy.injected_503 + proxy.injected_resets == \
            len(proxy.requests)
        if cfg.read_mode == "shard":
            fetched = Counter(r.path for r in proxy.requests if r.outcome in ("200", "206"))
            assert fetched.most_common(1)[0][1] == 1, f"fetched twice: {fetched.most_common(3)}"
            assert sum(p.endswith(".tar") for p in fetched) > 1
    finally:
        proxy.stop()


def test_missing_object_and_exhausted_retries(s3_dataset, tmp_path):
    server, uri = s3_dataset
    from dataloader.s3_store import S3Store

    store = S3Store(uri, endpoint_url=server.endpoint, region="us-east-1", max_retries=1)
    with pytest.raises(MissingObject, match="no/such.tar"):
        store.get("no/such.tar")
    proxy = FaultProxy(server.endpoint, p503=1.0)
    try:
        failing = S3Store(uri, endpoint_url=proxy.endpoint, region="us-east-1", max_retries=2, retry_base_s=0.001)
        with pytest.raises(StoreError, match="dataset.json.*3 attempts"):
            failing.get("dataset.json")
        assert len(proxy.arrivals) == 3
    finally:
        proxy.stop()
    assert "secret" not in store.describe().lower() and "k25testaccess" not in store.describe()


def test_a_forked_process_makes_its_own_s3_client(s3_dataset):
    """A child never reuses its parent's boto3 client (and its keep-alive sockets): with
    fork-started workers that is where mosaicml-streaming stalls for its 60 s timeout."""
    import multiprocessing as mp
    import os

    from dataloader.s3_store import S3Store

    server, uri = s3_dataset
    store = S3Store(uri, endpoint_url=server.endpoint, region="us-east-1")
    store.get("dataset.json")  # the parent's client now holds a pooled connection
    parent_client = id(store._client)
    ctx = mp.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child():
        data = store.get("dataset.json")
        send.send((store._client_pid == os.getpid(), id(store._client) != parent_client, len(data)))

    proc = ctx.Process(target=child)
    proc.start()
    assert receive.poll(60), "the child's GET did not finish"
    own, new, size = receive.recv()
    proc.join()
    assert own and new and size > 0
    assert store._client_pid == os.getpid() and id(store._client) == parent_client, "the parent keeps its own"
