"""Measure what a running job holds, to hold the planner (trainer/planner.py) to it.

    weights      bytes of every parameter the rank's engine holds
    grads        bytes of every .grad when the optimizer step starts
    state        the optimizer's own report (ZeRO-1 `state_bytes()`; torch AdamW: its moments)
    held         per forward (stage, microbatch): bytes autograd saved for backward (the
                 engine's memory-policy accounting, model/saved_tensors.py, when it has one:
                 its hooks shadow any outer ones; else parallel/activation_memory.py) plus
                 the chunk output the pipeline keeps
    media        the (t, h, w) items of each microbatch stage 0 ran (colocated encoder)
    pixels_host  bytes of the pixels in the step's batch (the loader's uint8 patches: DEP,
                 the items the plan gave the rank; colocated, stage 0's own items)
    pixels_device  bytes of the normalised patches the encoder reads (DEP: the rank's items,
                 parallel/dep.py; colocated: every microbatch's model inputs)
    peak         the largest sum of `held` over forwards whose backward has not run, walking
                 the rank's actions in the order the runtime ran them
"""
from __future__ import annotations

import torch

from parallel.activation_memory import SavedTensorBytes


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def distinct_bytes(tensors) -> int:
    """Bytes of tensors, each counted once (a DEP rank may encode an item of its own rows:
    the batch then holds its pixels twice)."""
    return tensor_bytes({t.data_ptr(): t for t in tensors}.values())


def peak_held(order: list[tuple[str, int, int]], held: dict[tuple[int, int], int]) -> int:
    """`order`: ("F" | "B", stage, microbatch) as they ran."""
    live = peak = 0
    for op, stage, mb in order:
        live += held[(stage, mb)] if op == "F" else -held[(stage, mb)]
        peak = max(peak, live)
    return peak


def probe_distributed(dist_engine) -> dict:
    """Patch a trainer.train.DistributedEngine so one step records what the rank holds."""
    engine = dist_engine.engine
    last = engine.runtime.num_stages - 1
    out: dict = {"held": {}, "grads": None, "recompute": [], "media": [], "pixels_host": 0,
                 "pixels_device": 0}
    dist_step, engine_step = dist_engine.step, engine.step

    def measured_dist_step(batch, lr):
        pixels = [m.patches for m in batch.media if m.patches is not None]
        out["pixels_host"] = distinct_bytes(pixels + (list(batch.group.pixels.values())
                                                      if batch.group is not None else []))
        return dist_step(batch, lr)

    def measured_engine_step(microbatches, lr, *args, **kwargs):
        out["pixels_device"] = distinct_bytes(m.patches for m in microbatches
                                              if m.patches is not None)
        return engine_step(microbatches, lr, *args, **kwargs)

    dist_engine.step, engine.step = measured_dist_step, measured_engine_step

    run = engine.runtime.run

    def measured_run(forward, loss_fn, make_pass=None, last_backward=None, recompute=None,
                     prefetch=None):
        if make_pass is not None:  # the overlapped schedule runs passes, not `forward`
            raise ValueError("the memory probe measures `forward`: run without ep_overlap")

        def measured_forward(stage, x, mb):
            memory = engine.memory
            if memory is not None:
                before = sum(memory.live.values())
                y = forward(stage, x, mb)
                saved_bytes = sum(memory.live.values()) - before
            else:
                with SavedTensorBytes() as saved:
                    y = forward(stage, x, mb)
                saved_bytes = saved.bytes
            kept = 0 if stage == last else y.numel() * y.element_size()
            out["held"][(stage, mb)] = saved_bytes + kept
            return y

        def measured_loss(logits, mb):
            with SavedTensorBytes() as saved:
                loss = loss_fn(logits, mb)
            out["held"][(last, mb)] += saved.bytes
            return loss
        return run(measured_forward, measured_loss, None, last_backward, recompute, prefetch)

    engine.runtime.run = measured_run
    if 0 in engine.stages:  # stage 0 runs its microbatches in order
        module = engine.stages[0]
        stage_forward = module.forward

        def recording_forward(x, inputs, media_embeds=None):
            out["media"].append([tuple(g) for g in inputs.grid_thw])
            return stage_forward(x, inputs, media_embeds)

        module.forward = recording_forward
    step = engine.optimizer.step

    def measured_step(lr):
        out["grads"] = engine.optimizer.memory_bytes()["grads"]  # the flat fp32 buffers
        return step(lr)

    engine.optimizer.step = measured_step
    if engine.dep is not None:
        dep, encode, dep_forward = engine.dep, engine.dep._encode, engine.dep.forward

        def measured_dep_forward(media):
            leaves = dep_forward(media)
            out["pixels_device"] += distinct_bytes(dep._patches.values())
            return leaves

        def measured_encode():
            if not torch.is_grad_enabled():
                return encode()
            memory = engine.memory
            if memory is not None:
                before = sum(memory.live.values())
                rows = encode()
                saved_bytes = sum(memory.live.values()) - before
            else:
                with SavedTensorBytes() as saved:
                    rows = encode()
                saved_bytes = saved.bytes
            out["recompute"].append((saved_bytes, [dep._grids[m.item_id] for m in dep._mine]))
            return rows

        dep._encode, dep.forward = measured_encode, measured_dep_forward
    return out


def finish_distributed(dist_engine, out: dict) -> dict:
    """After the step: the figures to compare, for this rank."""
    engine = dist_engine.engine
    order = [(a.op.value, a.stage, a.microbatch) for a in engine.runtime.actions
             if a.op.value in ("F", "B")]
    return {"pp_rank": dist_engine.topology.pp_rank, "dp_rank": dist_engine.topology.dp_rank,
            "weights": engine.optimizer.memory_bytes()["weights"], "grads": out["grads"],
            "state": engine.optimizer.state_bytes(),
            "peak": peak_held(order, out["held"]), "recompute": out["recompute"],
            "media": out["media"], "pixels_host": out["pixels_host"],
            "pixels_device": out["pixels_device"]}
