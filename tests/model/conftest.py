"""Fixtures shared by the model tests."""
import tempfile

import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def one_rank_group():
    """A gloo world of one (the all-to-all dispatcher and its guards need a process group);
    torn down after the module."""
    dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1), rank=0,
                            world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()
