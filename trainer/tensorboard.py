"""Per-step metrics as TensorBoard scalars, beside metrics.jsonl.

The writer takes the same record `MetricsWriter` writes, so the step loop builds one dict
and hands it to both. Every numeric field becomes a scalar tagged with its key (nested
dicts become "outer/inner" tags); strings and other values are skipped, because a record
may carry labels that are not curves. Events go to <run_dir>/tensorboard, so
`tensorboard --logdir <run_dir>` finds them and nothing else is written into run_dir.

`tensorboard` is an optional dependency: a disabled writer (every rank but the logging
one, or a job that turned it off) never imports it.
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Iterator

import torch


class TensorBoardWriter:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.log_dir = Path(run_dir) / "tensorboard"
        self._writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise RuntimeError(
                    "TensorBoard logging is enabled but the `tensorboard` package cannot be "
                    f"imported ({error}); install it (pip install tensorboard) or disable "
                    "TensorBoard logging in the job config") from error
            self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, record: dict) -> None:
        """Log every numeric field of `record` at step `record["step"]`."""
        if not self.enabled:
            return
        if "step" not in record:
            raise ValueError(f"metrics record has no 'step' field: keys {sorted(record)}")
        step = int(record["step"])
        for tag, value in _numeric_fields(record):
            if tag != "step":
                self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _numeric_fields(record: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _numeric_fields(value, prefix=f"{tag}/")
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            yield tag, float(value.item())
        elif isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
            yield tag, float(value)

