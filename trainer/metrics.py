"""Per-step metrics: one JSON object per line in <run_dir>/metrics.jsonl, and a console line."""
from __future__ import annotations

import json
from pathlib import Path


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, log_every: int = 1, first_step: int = 0):
        """`first_step` > 0 (a resume): records of that step and later, written before the
        interruption, are dropped so the file holds each step once."""
        self.enabled, self.log_every = enabled, log_every
        self.path = run_dir / "metrics.jsonl"
        self._recent: list[float] = []
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] < first_step]
                self.path.write_text("".join(line + "\n" for line in kept))
            self.file = self.path.open("a", buffering=1)

    def write(self, record: dict, total_steps: int | None = None) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self._recent.append(record["step_time_s"])
        if record["step"] % self.log_every == 0:
            progress, eta = "", ""
            if total_steps:
                left = total_steps - record["step"] - 1
                recent = self._recent[-20:]
                eta = f" | ETA {_clock(left * sum(recent) / len(recent))}"
                width = 20
                filled = round(width * (record["step"] + 1) / total_steps)
                progress = f"[{'#' * filled}{'.' * (width - filled)}] {record['step'] + 1}/{total_steps} "
            print(f"{progress}step {record['step']:5d} | loss {record['loss']:.4f} | "
                  f"grad_norm {record['grad_norm']:.3f} | lr {record['lr']:.2e} | "
                  f"{record['tokens_per_s']:.0f} tok/s | {record['step_time_s'] * 1e3:.0f} ms{eta}",
                  flush=True)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
