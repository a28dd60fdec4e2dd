"""TensorBoardWriter: records written, then read back from the event file."""
import sys

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from trainer.tensorboard import TensorBoardWriter

torch.set_num_threads(1)


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    accumulator = event_accumulator.EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_numeric_fields_become_scalars_at_their_step(tmp_path):
    records = [
        {"step": step, "loss": 5.0 / step, "grad_norm": 0.5 * step, "lr": 1e-3 * step,
         "tokens": 256 * step, "step_time_s": 0.25, "tokens_per_s": 1024.0,
         "phase": "warmup", "flops": {"tflops": 0.125 * step}, "expert_load": [3, 1]}
        for step in (1, 2, 5)]
    records[2]["lm_loss"] = torch.tensor(1.5)  # a field only some steps carry
    writer = TensorBoardWriter(tmp_path, enabled=True)
    for record in records:
        writer.write(record)
    writer.close()

    scalars = read_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s",
                            "flops/tflops", "lm_loss"}  # no step, string or list tags
    for key in ("loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s"):
        assert [step for step, _ in scalars[key]] == [1, 2, 5]
        # event files store float32
        assert [value for _, value in scalars[key]] == pytest.approx(
            [r[key] for r in records], rel=1e-6)
    assert scalars["flops/tflops"] == [(1, 0.125), (2, 0.25), (5, 0.625)]
    assert scalars["lm_loss"] == [(5, 1.5)]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = TensorBoardWriter(tmp_path, enabled=False)
    writer.write({"step": 1, "loss": 1.0})
    writer.close()
    assert not (tmp_path / "tensorboard").exists()


def test_record_without_step_is_refused(tmp_path):
    writer = TensorBoardWriter(tmp_path, enabled=True)
    with pytest.raises(ValueError, match="'step'"):
        writer.write({"loss": 1.0})
    writer.close()


def test_missing_tensorboard_fails_only_when_enabled(tmp_path, monkeypatch):
    # make `import tensorboard` fail and force torch.utils.tensorboard to import afresh
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    TensorBoardWriter(tmp_path, enabled=False).write({"step": 1, "loss": 1.0})
    with pytest.raises(RuntimeError, match="pip install tensorboard"):
        TensorBoardWriter(tmp_path, enabled=True)
