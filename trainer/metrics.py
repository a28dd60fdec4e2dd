"""Per-step metrics: one JSON object per line in <run_dir>/metrics.jsonl, and a console line."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, log_every: int = 1, first_step: int = 0):
        """`first_step` > 0 (a resume): records of that step and later, written before the
        interruption, are dropped so the file holds each step once."""
        self.enabled, self.log_every = enabled, log_every
        self.path = run_dir / "metrics.jsonl"
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] < first_step]
                self.path.write_text("".join(line + "\n" for line in kept))
            self.file = self.path.open("a", buffering=1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if record["step"] % self.log_every == 0:
            print(f"step {record['step']:5d} | loss {record['loss']:.4f} | "
                  f"grad_norm {record['grad_norm']:.3f} | lr {record['lr']:.2e} | "
                  f"{record['tokens_per_s']:.0f} tok/s | {record['step_time_s'] * 1e3:.0f} ms",
                  flush=True)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
