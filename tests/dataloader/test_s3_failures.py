"""What a user gets wrong with S3, against a real server (SeaweedFS): refused at once with what
to change, never retried in vain, never trusted from a stale cache, never logged with keys.

    warm cache + wrong secret      -> refused (the manifest is revalidated at every start)
    dataset.json changed in bucket -> seen; its objects cached under the new version
    no credentials / unknown bucket / connection refused -> one request, no retry
    endpoint that never answers    -> retries logged with their reason, stopped by the deadline
"""
from __future__ import annotations

import logging
import os
import socket
import stat
import threading

import pytest

from dataloader.loader import build_loader
from dataloader.s3_store import S3Store
from dataloader.store import StoreError
from dataloader.tiered_reader import cache_folder
from tests.dataloader.helpers import tiny_config
from tests.dataloader.s3_server import ACCESS_KEY, SECRET_KEY, FaultProxy


def s3_config(uri, endpoint, cache, **kw):
    return tiny_config(uri, s3_endpoint_url=endpoint, s3_region="us-east-1",
                       disk_cache_dir=str(cache) if cache else "", **kw)


@pytest.fixture
def own_prefix(s3_dataset, demo_dir, request):
    """The tiny demo under a prefix of this test's own (the session's copy stays untouched)."""
    server, _ = s3_dataset
    prefix = request.node.name.replace("[", "_").replace("]", "")[:40]
    server.upload_folder(demo_dir, "k25", prefix)
    return server, f"s3://k25/{prefix}"


def load(cfg):
    loader = build_loader(cfg, seed=4, dp_rank=0, dp_size=1, rows_per_step=2)
    next(loader)
    return loader


def test_warm_cache_with_a_wrong_secret_is_refused(own_prefix, tmp_path, monkeypatch, caplog):
    server, uri = own_prefix
    cfg = s3_config(uri, server.endpoint, tmp_path / "cache")
    load(cfg).close()  # the cache is warm now
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0123456789")
    with caplog.at_level(logging.INFO):  # what a run logs (botocore's DEBUG is its own business)
        with pytest.raises(StoreError, match="S3 refused the credentials .*SignatureDoesNotMatch"
                                             ".*AWS_SECRET_ACCESS_KEY"):
            load(cfg)
    assert "not-the-secret" not in caplog.text and SECRET_KEY not in caplog.text
    assert "retry" not in caplog.text  # a signature never gets better by asking again


def test_a_changed_manifest_is_seen_and_keys_the_cache(own_prefix, tmp_path):
    server, uri = own_prefix
    proxy = FaultProxy(server.endpoint)
    try:
        cfg = s3_config(uri, proxy.endpoint, tmp_path / "cache")
        first = load(cfg)
        assert "video" in first.dataset.source_names
        first.close()
        client = server.client()
        prefix = uri.split("/", 3)[3]
        manifest = client.get_object(Bucket="k25", Key=f"{prefix}/dataset.json")["Body"].read()
        import json
        changed = json.loads(manifest)
        del changed["sources"]["video"]
        client.put_object(Bucket="k25", Key=f"{prefix}/dataset.json",
                          Body=json.dumps(changed).encode())
        before = len(proxy.arrivals)
        second = load(cfg)
        assert "video" not in second.dataset.source_names
        assert second.dataset.version != first.dataset.version
        # the new version's indexes were fetched again, not served from the old version's cache
        assert len(proxy.arrivals) - before > len(changed["sources"])
        second.close()
    finally:
        proxy.stop()


def test_default_cache_folders_are_private(own_prefix, tmp_path, monkeypatch):
    import tempfile

    server, uri = own_prefix
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / f"k25-loader-cache-{os.getuid()}").mkdir(mode=0o755)  # as older versions left it
    os.chmod(tmp_path / f"k25-loader-cache-{os.getuid()}", 0o755)
    cfg = s3_config(uri, server.endpoint, None)
    load(cfg).close()
    folder = cache_folder(cfg)
    assert folder.startswith(str(tmp_path))
    for path in (os.path.dirname(folder), os.path.join(folder, "objects"),
                 os.path.join(folder, "locks"), os.path.join(folder, "budget")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, path


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_missing_credentials_are_not_retried(s3_dataset, no_credentials):
    server, uri = s3_dataset
    store = S3Store(uri, endpoint_url=server.endpoint, region="us-east-1")
    with pytest.raises(StoreError, match="no usable S3 credentials.*AWS_ACCESS_KEY_ID"):
        store.get("dataset.json")
    assert (store.requests, store.retries) == (1, 0)


def test_unknown_bucket_and_refused_connection_are_not_retried(s3_dataset):
    server, _ = s3_dataset
    store = S3Store("s3://no-such-bucket/x", endpoint_url=server.endpoint, region="us-east-1")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        store.get("dataset.json")
    assert (store.requests, store.retries) == (1, 0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = S3Store("s3://k25/demo", endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1")
    with pytest.raises(StoreError, match="connection refused.*data.s3_endpoint_url"):
        store.get("dataset.json")
    assert (store.requests, store.retries) == (1, 0)


def test_silent_endpoint_retries_with_reasons_until_the_deadline(s3_dataset, caplog):
    """An endpoint that accepts connections and never answers: each attempt times out, each
    retry is logged with its reason, and the deadline (not max_retries) ends it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # never answered
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        store = S3Store("s3://k25/demo", endpoint_url=f"http://127.0.0.1:{listener.getsockname()[1]}",
                        region="us-east-1", timeout_s=0.2, retry_deadline_s=0.5, max_retries=50,
                        retry_base_s=0.01, retry_max_s=0.02)
        with caplog.at_level(logging.WARNING, logger="dataloader.s3_store"):
            with pytest.raises(StoreError, match="still failing after .*retry_deadline_s=0.5"
                                                 ".*ReadTimeoutError"):
                store.get("dataset.json")
        retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
        assert 1 <= store.retries < 50 and len(retries) == store.retries
        assert all("ReadTimeoutError" in line for line in retries)
        assert ACCESS_KEY not in caplog.text and SECRET_KEY not in caplog.text
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()
