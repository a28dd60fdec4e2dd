"""One microbatch through one pipeline chunk, node by node, so two passes can interleave.

A chunk's forward is cut into nodes at every expert all-to-all. Compute nodes run on
detached inputs (their own small autograd graph); communication nodes are async
all-to-alls outside autograd, sent back with the splits swapped in the backward:

    MoE layer:   attn   x -> x + MLA(norm x), norm, router top-k, sort by expert    compute
                 disp   rows to the expert ranks                                  all-to-all
                 exp    regroup, grouped GEMMs, ungroup                             compute
                 comb   rows back to their tokens' rank                           all-to-all
                 post   weighted scatter-add + shared expert + residual             compute
    dense layer: one compute node.  Embedding (+ colocated encoder), head + loss: one each.

`forward_steps()` and `backward_steps()` are generators that yield right after starting
an all-to-all and wait for it only when the next node needs its result. Run alone, a
generator is simply exhausted. An FB action runs a backward and a forward together
(`run_together`), alternating segments, so every all-to-all of one is in flight while
the other computes (Megatron-Core's combined 1F1B / DeepSeek's DualPipe overlap):

    backward (chunk b, mb j):  post' [comb' >>>>>]  exp' [disp' >>>>>]  attn' post' [comb' >>
    forward  (chunk a, mb i):        attn [disp >>>>>]  exp  [comb >>>>>]  post attn ...
                                      ^ each all-to-all (>>>>) runs under the other's compute

The alternation is fixed (backward segment, forward segment, ...), so every rank of an
expert-parallel group issues its collectives in the same order. The exposed time (the
compute thread waiting on a handle) is summed in `wait_s`.

Numerics: the forward is op for op the monolithic layer's; in the backward, a tensor
used by two nodes (the residual stream) gets its two gradient contributions summed here
rather than inside one autograd graph, so results may differ from the monolithic
backward by float rounding (the tests allow 1e-6).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from model.attention import DocumentMask
from model.inputs import ModelInputs
from model.moe import MoE
from parallel.expert_dispatch import all_to_all_start
from parallel.step_clock import StepClock


@dataclass
class _Node:
    name: str
    leaves: list[torch.Tensor]  # detached stand-ins of earlier nodes' outputs (require grad)
    sources: list[torch.Tensor]  # the earlier outputs they stand for
    outputs: list[torch.Tensor]
    exchange: tuple | None = None  # all-to-all node: (send_splits, recv_splits, group)


class ChunkPass:
    """`stage`: the chunk (parallel.engine.StageModule); `x_in`: its input activation (a
    leaf that requires grad) or None on the embedding's chunk; `loss_fn` turns the head's
    summed loss into the step's contribution on the last chunk."""

    def __init__(self, stage, x_in: torch.Tensor | None, inputs: ModelInputs,
                 media_embeds: torch.Tensor | None, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                 clock: StepClock | None = None,
                 memory_pass: Callable[[], AbstractContextManager] = nullcontext):
        """`memory_pass()`: entered around every compute node (the memory policy's
        offload pass of this chunk and microbatch); never held across a yield."""
        self.memory_pass = memory_pass
        self.stage, self.x_in, self.inputs = stage, x_in, inputs
        self.media_embeds, self.loss_fn = media_embeds, loss_fn
        self.clock = clock or StepClock()
        # (name, issued, waited for) marks of every all-to-all: the profile's comm track
        self.comm: list[tuple[str, object, object]] = []
        self.nodes: list[_Node] = []
        self._produced: set[int] = set()
        self.output: torch.Tensor | None = None
        self.wait_s = 0.0  # time the caller waited on all-to-all handles (exposed comm)
        self.exchanges = 0  # all-to-alls started, forward and backward

    # ------------------------------------------------------------------ forward

    def _compute(self, name: str, fn, *args):
        leaves, sources, call = [], [], []
        for arg in args:
            if isinstance(arg, torch.Tensor) and id(arg) in self._produced:
                leaf = arg.detach().requires_grad_(arg.requires_grad)
                leaves.append(leaf)
                sources.append(arg)
                call.append(leaf)
            else:
                call.append(arg)
        with torch.enable_grad(), self.memory_pass():
            outputs = fn(*call)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        self.nodes.append(_Node(name, leaves, sources, list(outputs)))
        self._produced.update(id(t) for t in outputs)
        return outputs

    def _exchange(self, name: str, x: torch.Tensor, send, recv, group):
        """All-to-all node (a generator: yields once while in flight); nothing travels
        when `send` is None (one expert-parallel rank)."""
        if send is None:
            return x
        issued = self.clock.mark()
        pending = all_to_all_start(x, send, recv, group)
        self.exchanges += 1
        yield
        start = time.perf_counter()
        received = pending.wait().requires_grad_(x.requires_grad)
        self.wait_s += time.perf_counter() - start
        self.comm.append((name, issued, self.clock.mark()))
        self.nodes.append(_Node(name, [], [x], [received], (send, recv, group)))
        self._produced.add(id(received))
        return received

    def forward_steps(self) -> Iterator[None]:
        stage, inputs = self.stage, self.inputs
        lm = stage.lm
        x = self.x_in
        if lm.embed is not None:
            (x,) = self._compute("embed", lambda embeds: stage.embed_inputs(inputs, embeds),
                                 self.media_embeds)
        rope, mask = lm.rotary(inputs.position_ids), DocumentMask(inputs.doc_ids)
        for index, layer in lm.layers.items():
            if not isinstance(layer.ffn, MoE):
                (x,) = self._compute(f"layer{index}", lambda x, layer=layer: layer(x, rope, mask), x)
                continue
            moe, routes = layer.ffn, []
            B, S, D = x.shape

            def attention_and_route(x, layer=layer, moe=moe, routes=routes):
                x1 = layer.attention_block(x, rope, mask)
                with layer.memory.layer():
                    xn_TD, scores_TE = layer.ffn_input(x1)
                    topk_idx_TK, weights_TK = moe.route(xn_TD, scores_TE)
                    x_sorted, route = moe.memory.region("dispatch", moe.dispatcher.prepare,
                                                        xn_TD, topk_idx_TK)
                routes.append(route)
                return x1, xn_TD, weights_TK, x_sorted

            def experts(x_recv, layer=layer, moe=moe, routes=routes):
                route, region = routes[0], moe.memory.region
                with layer.memory.layer():
                    x_in = region("dispatch", moe.dispatcher.regroup, x_recv, route)
                    out = region("experts", moe.experts, x_in, route.rows_per_expert)
                    return region("combine", moe.dispatcher.ungroup, out, route)

            def combine(rows, x1, xn, weights, layer=layer, moe=moe, routes=routes):
                with layer.memory.layer():
                    return x1 + moe.combine_rows(rows, routes[0], weights, xn).view(B, S, D)

            x1, xn, weights, x_sorted = self._compute(f"attn{index}", attention_and_route, x)
            route = routes[0]
            group = getattr(moe.dispatcher, "group", None)
            x_recv = yield from self._exchange(f"dispatch{index}", x_sorted, route.send_splits,
                                               route.recv_splits, group)
            (out_recv,) = self._compute(f"experts{index}", experts, x_recv)
            rows = yield from self._exchange(f"combine{index}", out_recv, route.recv_splits,
                                             route.send_splits, group)
            (x,) = self._compute(f"post{index}", combine, rows, x1, xn, weights)
        if lm.head is not None:
            (x,) = self._compute("head", lambda x: self.loss_fn(lm.head_loss(x, inputs.labels)),
                                 x)
        self.output = x

    # ------------------------------------------------------------------ backward

    def backward_steps(self, grad_output: torch.Tensor | None) -> Iterator[None]:
        """Back-propagate `grad_output` (None on the last chunk: the output is the loss);
        parameter grads accumulate as usual, the input's grad lands in `x_in.grad`."""
        grads = {id(self.output): (torch.ones_like(self.output) if grad_output is None
                                   else grad_output)}

        def add(tensor: torch.Tensor, grad: torch.Tensor) -> None:
            key = id(tensor)
            grads[key] = grad if key not in grads else grads[key] + grad

        for node in reversed(self.nodes):
            if node.exchange is not None:
                send, recv, group = node.exchange
                out = node.outputs[0]
                grad = grads.pop(id(out), None)
                if grad is None:  # every rank must take part in the all-to-all
                    grad = torch.zeros_like(out)
                issued = self.clock.mark()
                pending = all_to_all_start(grad, recv, send, group)
                self.exchanges += 1
                yield
                start = time.perf_counter()
                add(node.sources[0], pending.wait())
                self.wait_s += time.perf_counter() - start
                self.comm.append((node.name + " backward", issued, self.clock.mark()))
                continue
            pairs = [(out, grads.pop(id(out))) for out in node.outputs
                     if id(out) in grads and out.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            for leaf, source in zip(node.leaves, node.sources):
                if leaf.grad is not None:
                    add(source, leaf.grad)
        self.nodes = []


def run_together(backward: Iterator[None], forward: Iterator[None]) -> None:
    """Alternate the segments of a backward and a forward pass until both are done."""
    running = [backward, forward]
    while running:
        for steps in list(running):
            try:
                next(steps)
            except StopIteration:
                running.remove(steps)


def run_alone(steps: Iterator[None]) -> None:
    for _ in steps:
        pass
