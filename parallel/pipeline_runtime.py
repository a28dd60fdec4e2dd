"""Executes one rank's pipeline schedule (a list of `Action`s) for one optimizer step.

The schedule is data (`parallel/schedule.py`); this runtime only walks it:

    RECV_F s.m  receive stage s's input activation                     (from the rank of s-1)
    F s.m       forward of chunk s on microbatch m; the last stage's output is its loss
    SEND_F s.m  send the output                                         (to the rank of s+1)
    RECV_B s.m  receive the gradient of stage s's output                (from the rank of s+1)
    B s.m       backward of chunk s on microbatch m (parameter grads accumulate)
    SEND_B s.m  send the gradient of stage s's input                    (to the rank of s-1)
    R           DEP only: recompute the vision encoder's forward (the caller's `recompute`);
                right after a SEND/RECV batch it runs while the batch is in flight (posted,
                R, then waited for): the rank fills a wait (parallel/dep_bubbles.py)

Consecutive SEND/RECV actions are posted together as one `batch_isend_irecv` and waited
for together (`schedule.comm_batches`), exactly the rendezvous semantics under which
the simulator proves every generated schedule deadlock-free: on NCCL a send may wait for
its receiver, and facing sends would block both ranks if they were issued one at a time.
The same code runs on gloo. Consecutive chunks always sit on different ranks (with pp = 1
there is one chunk: the layout check refuses vpp > 1 without pp > 1), so every hand-over
between chunks is a SEND/RECV pair. Every action is timestamped (`timeline`); the actions
of one batch share its start and end (they complete together). The last backward
of each chunk in the step runs inside `last_backward(stage)` when the caller passes it:
that is when the chunk's parameter gradients become final, so ZeRO-1 can start reducing
them while later backwards run.

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

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from parallel.chunk_pass import ChunkPass, run_alone, run_together
from parallel.schedule import COMM_OPS, Action, Op, comm_batches
from parallel.step_clock import StepClock

# (stage, input or None for stage 0, microbatch index) -> output (hidden states or logits)
StageForward = Callable[[int, "torch.Tensor | None", int], torch.Tensor]
# (output of the last stage, microbatch index) -> scalar loss contribution
LossFn = Callable[[torch.Tensor, int], torch.Tensor]
# stage -> context around that chunk's last backward of the step
LastBackward = Callable[[int], AbstractContextManager]
# (stage, input or None for stage 0, microbatch index) -> that chunk's node-by-node pass
PassFactory = Callable[[int, "torch.Tensor | None", int], ChunkPass]


def _within(context: AbstractContextManager, steps: Iterator[None]) -> Iterator[None]:
    """`steps`, run inside `context` (entered at the first step, left after the last)."""
    with context:
        yield from steps


def _then(steps: Iterator[None], finish: Callable[[], object]) -> Iterator[None]:
    """`steps`, then `finish()` once they are exhausted."""
    yield from steps
    finish()


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
        self.a2a: dict[str, list] = {"alone": [0, 0.0], "paired": [0, 0.0]}
        self._comm_marks: list[tuple[str, object, object]] = []

    @property
    def comm_timeline(self) -> list[tuple[str, float, float]]:
        """The last step's expert all-to-alls of node-by-node passes: (name, issued, waited
        for), on the timeline's clock (in flight at most from issue to wait)."""
        return [(name, self.clock.seconds(a), self.clock.seconds(b))
                for name, a, b in self._comm_marks]

    @property
    def timeline(self) -> list[ActionRecord]:
        """The last step's actions with their times (once the clock is resolved)."""
        return [ActionRecord(a, self.clock.seconds(b), self.clock.seconds(e))
                for a, b, e in self._marks]

    def _tag(self, stage: int, microbatch: int, backward: bool) -> int:
        """Unique per message: activation into `stage`, or gradient out of `stage`."""
        return ((self.num_stages if backward else 0) + stage) * self.microbatches + microbatch

    def run(self, forward: StageForward, loss_fn: LossFn,
            make_pass: PassFactory | None = None,
            last_backward: LastBackward | None = None,
            recompute: Callable[[], object] | None = None,
            prefetch: Callable[[tuple[int, int]], None] | None = None) -> torch.Tensor:
        """Run the schedule; return the summed loss of the microbatches this rank finished.

        With `make_pass` every chunk runs node by node (parallel/chunk_pass.py) and FB
        actions interleave a backward with a forward; without it (the schedule then has no
        FB) each F/B is one autograd call of `forward` / `backward`. `last_backward(stage)`
        is entered around each chunk's last backward of the step (also inside an FB).
        `prefetch((stage, microbatch))` is called as each compute action starts, for its
        own backward and for the backward of the next compute action, so offloaded
        activations travel back one action ahead, while this one computes (model/offload.py):

            actions    F 0.2   B 0.0   F 0.3   B 0.1   B 0.2
            prefetch   (0,0)   (0,0)           (0,1)   (0,2)
                                       (0,1)   (0,2)          (repeats move nothing)

        `recompute` runs at the schedule's R action (DEP), which it needs if there is one."""
        if recompute is None and any(a.op is Op.R for a in self.actions):
            raise ValueError("the schedule holds an R action (DEP's encoder recompute) but no "
                             "`recompute` was given")
        last = self.num_stages - 1
        final_backward = {}  # stage -> microbatch of its last backward in the step
        for a in self.actions:
            if a.op in (Op.B, Op.FB):
                final_backward[a.b_stage if a.op is Op.FB else a.stage] = (
                    a.b_microbatch if a.op is Op.FB else a.microbatch)
        inputs: dict[tuple[int, int], torch.Tensor] = {}  # stage input, requires grad
        outputs: dict[tuple[int, int], torch.Tensor] = {}  # stage output, or loss on the last
        output_grads: dict[tuple[int, int], torch.Tensor] = {}
        input_grads: dict[tuple[int, int], torch.Tensor] = {}
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        passes: dict[tuple[int, int], ChunkPass] = {}
        # all-to-alls of node-by-node passes: how many started, and the time spent waiting on
        # them, in passes run alone (warm-up, cool-down) and in FB pairs (the steady state)
        self.a2a = {"alone": [0, 0.0], "paired": [0, 0.0]}
        self._comm_marks = []
        marks = self._marks = []
        if self._owns_clock:
            self.clock.start()

        def count(chunk: ChunkPass | None, bucket: str) -> None:
            if chunk is not None:
                self.a2a[bucket][0] += chunk.exchanges
                self.a2a[bucket][1] += chunk.wait_s
                self._comm_marks.extend(chunk.comm)
                chunk.exchanges, chunk.wait_s, chunk.comm = 0, 0.0, []

        def start_forward(s: int, mb: int, bucket: str = "alone"):
            """The forward of (s, mb): run now, or (node mode) a generator to run."""
            x = inputs.get((s, mb)) if s > 0 else None
            if make_pass is None:
                out = forward(s, x, mb)
                finish_forward(s, mb, loss_fn(out, mb) if s == last else out)
                return iter(())
            chunk = passes[(s, mb)] = make_pass(s, x, mb)

            def finish() -> None:
                count(chunk, bucket)
                finish_forward(s, mb, chunk.output)
            return _then(chunk.forward_steps(), finish)

        def finish_forward(s: int, mb: int, out: torch.Tensor) -> None:
            nonlocal loss_sum
            if s == last:
                loss_sum = loss_sum + out.detach()
            outputs[(s, mb)] = out

        def start_backward(s: int, mb: int, bucket: str = "alone"):
            """The backward of (s, mb): run now, or (node mode) a generator to run."""
            out = outputs.pop((s, mb))
            grad = None if s == last else output_grads.pop((s, mb))
            context = (last_backward(s) if last_backward is not None and final_backward[s] == mb
                       else nullcontext())
            if make_pass is None:
                with context:
                    out.backward(grad)
                finish_backward(s, mb)
                return iter(())
            chunk = passes.pop((s, mb))

            def finish() -> None:
                count(chunk, bucket)
                finish_backward(s, mb)
            return _then(_within(context, chunk.backward_steps(grad)), finish)

        def finish_backward(s: int, mb: int) -> None:
            if s > 0:
                input_grads[(s, mb)] = inputs.pop((s, mb)).grad

        # the backward each compute action runs (None for F), in order: what to prefetch
        compute = [a for a in self.actions if a.op in (Op.F, Op.B, Op.FB)]
        backward_of = [(a.b_stage, a.b_microbatch) if a.op is Op.FB else
                       (a.stage, a.microbatch) if a.op is Op.B else None for a in compute]
        compute_index = 0

        steps = comm_batches(self.actions)
        for index, step in enumerate(steps):
            start = self.clock.mark()
            action = step[0]
            if prefetch is not None and action.op in (Op.F, Op.B, Op.FB):
                for key in backward_of[compute_index:compute_index + 2]:
                    if key is not None:
                        prefetch(key)
                compute_index += 1
            key = (action.stage, action.microbatch)
            s, mb = key
            if action.op is Op.F:
                run_alone(start_forward(s, mb))
            elif action.op is Op.B:
                run_alone(start_backward(s, mb))
            elif action.op is Op.FB:
                run_together(start_backward(action.b_stage, action.b_microbatch, "paired"),
                             start_forward(s, mb, "paired"))
            elif action.op is Op.R:
                if index == 0 or steps[index - 1][0].op not in COMM_OPS:
                    recompute()  # else it ran inside the batch before it
                    marks.append((action, start, self.clock.mark()))
                continue
            else:
                pending = self._post(step, outputs, input_grads)
                if index + 1 < len(steps) and steps[index + 1][0].op is Op.R:
                    recompute()  # while the batch is in flight
                    marks.append((steps[index + 1][0], start, self.clock.mark()))
                self._finish(pending, inputs, output_grads)
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

    def _post(self, batch: list[Action], outputs, input_grads) -> tuple[list, list, list]:
        """Post one batch of sends and receives together; `_finish` waits for all of them."""
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
        return dist.batch_isend_irecv(ops), received, ops  # ops: the tensors stay alive

    def _finish(self, pending: tuple[list, list, list], inputs, output_grads) -> None:
        works, received, _ = pending
        for work in works:
            work.wait()
        for action, buf in received:
            key = (action.stage, action.microbatch)
            if action.op is Op.RECV_F:
                inputs[key] = buf.requires_grad_()
            else:
                output_grads[key] = buf
