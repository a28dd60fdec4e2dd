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
