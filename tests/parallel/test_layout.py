"""Every invalid parallel layout is refused at start-up with what to change."""
import pytest

from model.config import ConfigError
from parallel.topology import LayoutError, ParallelSizes, check_layout
from trainer.config import load_config


@pytest.mark.parametrize("sizes, kwargs, message", [
    (ParallelSizes(pp=2, dp=2), dict(world_size=3), "launch 4 ranks or change pp/dp"),
    (ParallelSizes(pp=3), dict(world_size=3), "do not split evenly into parallel.pp x parallel.vpp"),
    (ParallelSizes(pp=2, vpp=3), dict(), "2 x 3 = 6 pipeline chunks"),
    (ParallelSizes(ep=3, dp=3), dict(world_size=3), "num_experts=16 do not split over parallel.ep=3"),
    (ParallelSizes(ep=4, dp=2), dict(), "parallel.ep=4 must divide parallel.dp=2"),
    (ParallelSizes(pp=2, vpp=2), dict(microbatches=3), "positive multiple of parallel.pp=2"),
    (ParallelSizes(pp=2, vpp=2), dict(microbatches=1), "positive multiple of parallel.pp=2"),
    (ParallelSizes(vpp=2), dict(), "vpp > 1 needs parallel.pp > 1"),
    (ParallelSizes(dp=0), dict(), "parallel.dp must be >= 1"),
])
def test_check_layout_refuses(sizes, kwargs, message):
    args = dict(layers=4, num_experts=16, microbatches=4) | kwargs
    with pytest.raises(LayoutError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_layout(sizes, **args)


def test_valid_layouts_pass():
    for sizes, m in [(ParallelSizes(pp=2, vpp=2, ep=2, dp=2), 2), (ParallelSizes(pp=4), 1),
                     (ParallelSizes(ep=16, dp=16), 1), (ParallelSizes(), 1)]:
        check_layout(sizes, layers=4, num_experts=16, microbatches=m, world_size=sizes.world)


def test_job_config_refuses_through_the_same_checks():
    cfg = load_config(["--parallel.pp", "2", "--parallel.vpp", "2", "--parallel.dp", "2",
                       "--train.global_batch", "6", "--train.micro_batch", "1"])
    with pytest.raises(ConfigError, match="microbatches per replica \\(3"):
        cfg.validate(world_size=4)
    cfg = load_config(["--parallel.pp", "2", "--parallel.dp", "2"])
    with pytest.raises(ConfigError, match="the job has 8 ranks"):
        cfg.validate(world_size=8)
