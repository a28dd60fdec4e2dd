"""Loader worker processes do not outlive a main process that was killed (no close())."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
            found += kids
            todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("start_method", ["forkserver", "fork"])  # two ways to notice
def test_workers_exit_when_their_main_process_is_killed(demo_dir, tmp_path, start_method):
    script = tmp_path / "loader_main.py"
    script.write_text(
        "import sys, time\n"
        "from dataloader.loader import build_loader\n"
        "from tests.dataloader.helpers import tiny_config\n"
        "if __name__ == '__main__':\n"
        "    cfg = tiny_config(sys.argv[1], workers=2, worker_start_method=sys.argv[2])\n"
        "    loader = build_loader(cfg, seed=0, dp_rank=0,\n"
        "                          dp_size=1, rows_per_step=2)\n"
        "    next(loader)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(600)\n")
    main = subprocess.Popen([sys.executable, str(script), demo_dir, start_method], cwd=ROOT,
                            text=True,
                            stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    workers = []
    try:
        assert main.stdout.readline().strip() == "ready"
        workers = descendants(main.pid)  # the workers (and the forkserver, resource tracker)
        assert len(workers) >= 2
        main.send_signal(signal.SIGKILL)
        main.wait()
        deadline = time.time() + 60
        while any(alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.2)
        left = [p for p in workers if alive(p)]
    finally:
        for p in workers:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        if main.poll() is None:
            main.kill()
    assert not left, f"loader processes {left} outlived their main process"
