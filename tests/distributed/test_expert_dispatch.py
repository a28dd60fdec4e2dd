"""The all-to-all dispatcher on 4 gloo ranks equals the local MoE (see dispatch_worker.py)."""
import pytest

from tests.distributed.launcher import torchrun

pytestmark = pytest.mark.slow  # four gloo ranks under torchrun


def test_all_to_all_dispatcher_equals_local_moe(tmp_path):
    out = tmp_path / "out.txt"
    torchrun("tests.distributed.dispatch_worker", 4, "--out", str(out))
    lines = out.read_text().splitlines()
    assert lines == ["ok ep=world, 2 experts per rank, one starved expert",
                     "ok ep = number of experts", "ok ep=1"]
