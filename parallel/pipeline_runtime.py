"""Executes one rank's pipeline schedule (a list of `Action`s) for one optimizer step.

The schedule is data (`parallel/schedule.py`); this runtime only walks it:

    RECV_F s.m  blocking receive of stage s's input activation        (from the rank of s-1)
    F s.m       forward of chunk s on microbatch m; the last stage's output is its loss
    SEND_F s.m  non-blocking send of the output                         (to the rank of s+1)
    RECV_B s.m  blocking receive of the gradient of stage s's output    (from the rank of s+1)
    B s.m       backward of chunk s on microbatch m (parameter grads accumulate)
    SEND_B s.m  non-blocking send of the gradient of stage s's input    (to the rank of s-1)

Sends are non-blocking and receives block, exactly the semantics the schedule
simulator proves deadlock-free. Consecutive chunks always sit on different ranks
(with pp = 1 there is one chunk: the layout check refuses vpp > 1 without pp > 1),
so every hand-over between chunks is a SEND/RECV pair. Every action is timestamped (`timeline`), so
the measured bubble can be compared with the simulated one.

Why our own runtime rather than `torch.distributed.pipelining`'s
`_PipelineScheduleRuntime`: (1) stage 0's inputs are not tensors that split
along the batch dimension (a variable list of media items per microbatch, and
for DEP, embeddings whose gradients must be read after the schedule); (2) the
loss is normalised by the global labelled-token count across microbatches and
data-parallel replicas rather than by the microbatch count; (3) profiling needs
a timestamp per action, which torch's runtime does not expose; (4) the
expert-parallel overlap work runs a forward and a backward together, with
all-to-alls on gloo async handles, which needs control of the loop body. The
runtime is small because the schedule, not the runtime, carries the logic.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from parallel.schedule import Action, Op

# (stage, input or None for stage 0, microbatch index) -> output (hidden states or logits)
StageForward = Callable[[int, "torch.Tensor | None", int], torch.Tensor]
# (output of the last stage, microbatch index) -> scalar loss contribution
LossFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class ActionRecord:
    action: Action
    start: float  # seconds, time.perf_counter()
    end: float


class PipelineRuntime:
    def __init__(self, actions: list[Action], *, num_stages: int, microbatches: int,
                 stage_rank: Callable[[int], int], activation_shape: tuple[int, ...],
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.actions = actions
        self.num_stages = num_stages
        self.microbatches = microbatches
        self.stage_rank = stage_rank
        self.activation_shape = activation_shape
        self.dtype = dtype
        self.device = torch.device(device)
        self.timeline: list[ActionRecord] = []

    def _tag(self, stage: int, microbatch: int, backward: bool) -> int:
        """Unique per message: activation into `stage`, or gradient out of `stage`."""
        return ((self.num_stages if backward else 0) + stage) * self.microbatches + microbatch

    def run(self, forward: StageForward, loss_fn: LossFn) -> torch.Tensor:
        """Run the schedule; return the summed loss of the microbatches this rank finished."""
        last = self.num_stages - 1
        inputs: dict[tuple[int, int], torch.Tensor] = {}  # stage input, requires grad
        outputs: dict[tuple[int, int], torch.Tensor] = {}  # stage output, or loss on the last
        output_grads: dict[tuple[int, int], torch.Tensor] = {}
        input_grads: dict[tuple[int, int], torch.Tensor] = {}
        sends: list[tuple[dist.Work, torch.Tensor]] = []
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self.timeline = []
        for action in self.actions:
            start = time.perf_counter()
            key = (action.stage, action.microbatch)
            s, mb = key
            if action.op is Op.RECV_F:
                buf = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
                dist.recv(buf, src=self.stage_rank(s - 1), tag=self._tag(s, mb, False))
                inputs[key] = buf.requires_grad_()
            elif action.op is Op.F:
                out = forward(s, inputs.get(key) if s > 0 else None, mb)
                if s == last:
                    out = loss_fn(out, mb)
                    loss_sum += out.detach()
                outputs[key] = out
            elif action.op is Op.SEND_F:
                payload = outputs[key].detach()
                sends.append((dist.isend(payload, dst=self.stage_rank(s + 1),
                                         tag=self._tag(s + 1, mb, False)), payload))
            elif action.op is Op.RECV_B:
                buf = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
                dist.recv(buf, src=self.stage_rank(s + 1), tag=self._tag(s + 1, mb, True))
                output_grads[key] = buf
            elif action.op is Op.B:
                out = outputs.pop(key)
                if s == last:
                    out.backward()
                else:
                    out.backward(output_grads.pop(key))
                if s > 0:
                    input_grads[key] = inputs.pop(key).grad
            elif action.op is Op.SEND_B:
                payload = input_grads.pop(key)
                sends.append((dist.isend(payload, dst=self.stage_rank(s - 1),
                                         tag=self._tag(s, mb, True)), payload))
            self.timeline.append(ActionRecord(action, start, time.perf_counter()))
        for work, _ in sends:
            work.wait()
        leftovers = {name: d for name, d in (("inputs", inputs), ("outputs", outputs),
                                             ("output grads", output_grads),
                                             ("input grads", input_grads)) if d}
        if leftovers:
            raise RuntimeError(f"pipeline schedule left unconsumed tensors: "
                               f"{ {k: sorted(v) for k, v in leftovers.items()} }")
        return loss_sum
