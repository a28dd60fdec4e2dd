"""Executes one rank's pipeline schedule (a list of `Action`s) for one optimizer step.

The schedule is data (`parallel/schedule.py`); this runtime only walks it:

    RECV_F s.m  receive stage s's input activation                     (from the rank of s-1)
    F s.m       forward of chunk s on microbatch m; the last stage's output is its loss
    SEND_F s.m  send the output                                         (to the rank of s+1)
    RECV_B s.m  receive the gradient of stage s's output                (from the rank of s+1)
    B s.m       backward of chunk s on microbatch m (parameter grads accumulate)
    SEND_B s.m  send the gradient of stage s's input                    (to the rank of s-1)

Consecutive SEND/RECV actions are posted together as one `batch_isend_irecv` and waited
for together (`schedule.comm_batches`), exactly the rendezvous semantics under which
the simulator proves every generated schedule deadlock-free: on NCCL a send may wait for
its receiver, and facing sends would block both ranks if they were issued one at a time.
The same code runs on gloo. Consecutive chunks always sit on different ranks (with pp = 1
there is one chunk: the layout check refuses vpp > 1 without pp > 1), so every hand-over
between chunks is a SEND/RECV pair. Every action is timestamped (`timeline`); the actions
of one batch share its start and end (they complete together).

Why our own runtime rather than `torch.distributed.pipelining`'s
`_PipelineScheduleRuntime`: (1) stage 0's inputs are not tensors that split
along the batch dimension (a variable list of media items per microbatch, and
for DEP, embeddings whose gradients must be read after the schedule); (2) the
loss is normalised by the global labelled-token count across microbatches and
data-parallel replicas rather than by the microbatch count; (3) profiling needs
a timestamp per action, which torch's runtime does not expose; (4) the
expert-parallel overlap work runs a forward and a backward together, with
all-to-alls on async handles, which needs control of the loop body. The
runtime is small because the schedule, not the runtime, carries the logic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from parallel.schedule import Action, Op, comm_batches
from parallel.step_clock import StepClock

# (stage, input or None for stage 0, microbatch index) -> output (hidden states or logits)
StageForward = Callable[[int, "torch.Tensor | None", int], torch.Tensor]
# (output of the last stage, microbatch index) -> scalar loss contribution
LossFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class ActionRecord:
    action: Action
    start: float  # seconds on the host clock (time.perf_counter; CUDA events resolved to it)
    end: float


class PipelineRuntime:
    def __init__(self, actions: list[Action], *, num_stages: int, microbatches: int,
                 stage_rank: Callable[[int], int], activation_shape: tuple[int, ...],
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 clock: StepClock | None = None):
        """`clock`: shared with the caller, who then starts and resolves it around the step
        (the engine times its own phases on it); by default the runtime owns one."""
        self.actions = actions
        self.num_stages = num_stages
        self.microbatches = microbatches
        self.stage_rank = stage_rank
        self.activation_shape = activation_shape
        self.dtype = dtype
        self.device = torch.device(device)
        self._owns_clock = clock is None
        self.clock = clock or StepClock(self.device)
        self._marks: list[tuple[Action, object, object]] = []

    @property
    def timeline(self) -> list[ActionRecord]:
        """The last step's actions with their times (once the clock is resolved)."""
        return [ActionRecord(a, self.clock.seconds(b), self.clock.seconds(e))
                for a, b, e in self._marks]

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
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        marks = self._marks = []
        if self._owns_clock:
            self.clock.start()
        for step in comm_batches(self.actions):
            start = self.clock.mark()
            action = step[0]
            key = (action.stage, action.microbatch)
            s, mb = key
            if action.op is Op.F:
                out = forward(s, inputs.get(key) if s > 0 else None, mb)
                if s == last:
                    out = loss_fn(out, mb)
                    loss_sum += out.detach()
                outputs[key] = out
            elif action.op is Op.B:
                out = outputs.pop(key)
                if s == last:
                    out.backward()
                else:
                    out.backward(output_grads.pop(key))
                if s > 0:
                    input_grads[key] = inputs.pop(key).grad
            else:
                self._exchange(step, inputs, outputs, output_grads, input_grads)
                end = self.clock.mark()
                marks.extend((a, start, end) for a in step)
                continue
            marks.append((action, start, self.clock.mark()))
        if self._owns_clock:
            self.clock.resolve()
        leftovers = {name: d for name, d in (("inputs", inputs), ("outputs", outputs),
                                             ("output grads", output_grads),
                                             ("input grads", input_grads)) if d}
        if leftovers:
            raise RuntimeError(f"pipeline schedule left unconsumed tensors: "
                               f"{ {k: sorted(v) for k, v in leftovers.items()} }")
        return loss_sum

    def _exchange(self, batch: list[Action], inputs, outputs, output_grads, input_grads) -> None:
        """Post one batch of sends and receives together, wait for all of them."""
        ops, received = [], []
        for action in batch:
            s, mb = key = (action.stage, action.microbatch)
            if action.op is Op.SEND_F:
                ops.append(dist.P2POp(dist.isend, outputs[key].detach(), self.stage_rank(s + 1),
                                      tag=self._tag(s + 1, mb, False)))
            elif action.op is Op.SEND_B:
                ops.append(dist.P2POp(dist.isend, input_grads.pop(key), self.stage_rank(s - 1),
                                      tag=self._tag(s, mb, True)))
            else:
                buf = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
                backward = action.op is Op.RECV_B
                peer = self.stage_rank(s + 1 if backward else s - 1)
                ops.append(dist.P2POp(dist.irecv, buf, peer,
                                      tag=self._tag(s + 1 if backward else s, mb, backward)))
                received.append((action, buf))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        for action, buf in received:
            key = (action.stage, action.microbatch)
            if action.op is Op.RECV_F:
                inputs[key] = buf.requires_grad_()
            else:
                output_grads[key] = buf
