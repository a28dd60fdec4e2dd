"""Shared fixtures: a tiny demo dataset (built once per session) and loader helpers."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)

TINY = dict(num_digits=40, num_text_docs=24, video_photos=("astronaut", "coffee"), samples_per_shard=8)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    """The demo dataset builder run with small sizes: ~70 samples in 4 sources."""
    from launch.make_dataset import build

    out = str(tmp_path_factory.mktemp("demo"))
    build(out, **TINY)
    return out


@pytest.fixture(scope="session")
def s3_dataset(demo_dir, tmp_path_factory):
    """SeaweedFS on 127.0.0.1 (own ports, temp folder) holding the tiny demo at s3://k25/demo.

    Yields (server, uri). The test identity's keys go into this process's environment, as
    boto3's standard credential chain reads them from there."""
    import os

    from tests.dataloader.s3_server import ACCESS_KEY, SECRET_KEY, start_seaweedfs

    server = start_seaweedfs(str(tmp_path_factory.mktemp("seaweedfs")))
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION="us-east-1")
    try:
        server.upload_folder(demo_dir, "k25", "demo")
        yield server, "s3://k25/demo"
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
