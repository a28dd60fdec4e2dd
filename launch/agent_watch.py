"""Workers notice that their torchrun agent is gone, and stop.

torchrun starts each worker in a session of its own, so when the agent itself is killed
(SIGKILL, the OOM killer) nothing reaches the workers: they are re-parented to init (or a
subreaper) and would go on training with nobody to collect them. A daemon thread polls
the parent pid; when it changes, the agent is gone:

    agent (pid A) ──► worker: getppid() == A ... == A ... == 1   -> on_lost(A)

`on_lost` asks for the same clean stop as SIGTERM (finish the step, agree with every
rank, checkpoint, exit). If the job cannot get there, the progress watchdog ends it.
A poll works everywhere (Linux' PR_SET_PDEATHSIG would fire when the agent's *thread*
that started us exits, and exists on Linux only); it costs one syscall a second.
"""
from __future__ import annotations

import os
import threading
import time


def watch_agent(on_lost, poll_s: float = 1.0) -> bool:
    """Call `on_lost(agent_pid)` once the process that started us is gone. Only under
    torchrun (TORCHELASTIC_RUN_ID is set): a process started from a shell keeps running
    when the shell exits, as usual. Returns whether it watches."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    agent = os.getppid()

    def run() -> None:
        while os.getppid() == agent and agent != 1:
            time.sleep(poll_s)
        on_lost(agent)

    threading.Thread(target=run, name="k25-agent-watch", daemon=True).start()
    return True
