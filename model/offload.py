"""Saved activations parked in host memory between their forward and their backward.

    forward, at save time      stash: copy to (pinned) host memory on the offload stream,
                               the device copy is freed as soon as autograd drops it
    one action before the      prefetch(key): copy every tensor of that pass back to the
    backward of pass `key`     device on the offload stream (the pipeline runtime knows
                               which backward comes next: parallel/pipeline_runtime.py)
    backward, at unpack        fetch: wait for the prefetch's event (or copy now if none ran)

On CUDA the copies run on a side stream, so they overlap the compute of the current action;
`record_stream` keeps the allocator from reusing a tensor's memory before its copy is done.
On CPU the "host pool" is a separate set of CPU tensors and every copy is a real copy, so
the mechanism, its ordering and its byte accounting are exercised without a GPU (only the
overlap is not).

A pass key is whatever the caller uses to name one forward of one chunk (the pipeline
runtime: (stage, microbatch)). A tensor saved by several ops of one region is stashed once
(model/saved_tensors.py finds the earlier entry). Known limits: a storage saved in several
regions, or as different views, is copied once per region and view (the rotary tables, a
few KiB per layer); the pinned buffers come from torch's caching host allocator (no pool
of our own).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch


class Offloaded:
    """One stashed tensor (or the payload and scale of an FP8 one): where it is now."""

    def __init__(self, host: list[torch.Tensor], nbytes: int,
                 on_move: Callable[[str, str, int], None]):
        self.host: list[torch.Tensor] | None = host
        self.device_copy: list[torch.Tensor] | None = None
        self.ready: torch.cuda.Event | None = None
        self.nbytes = nbytes
        self._on_move = on_move
        on_move("", "host", nbytes)

    def __del__(self) -> None:
        self._on_move("host" if self.device_copy is None else "device", "", self.nbytes)


class OffloadPool:
    def __init__(self, device: torch.device, on_move: Callable[[str, str, int], None]):
        """`on_move(src, dst, nbytes)`: the accounting ("" = nowhere, "host", "device")."""
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._on_move = on_move
        self._by_key: dict[Hashable, list[weakref.ref]] = {}

    def stash(self, tensors: list[torch.Tensor], key: Hashable) -> Offloaded:
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if self.stream is None:
            host = [t.detach().clone() for t in tensors]
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
                    t.detach(), non_blocking=True) for t in tensors]
            for t in tensors:
                t.record_stream(self.stream)
        entry = Offloaded(host, nbytes, self._on_move)
        self._by_key.setdefault(key, []).append(weakref.ref(entry))
        return entry

    def prefetch(self, key: Hashable) -> int:
        """Start copying pass `key`'s tensors back to the device; returns the bytes moved."""
        moved = 0
        for ref in self._by_key.pop(key, []):
            entry = ref()
            if entry is not None and entry.device_copy is None:
                self._bring_back(entry)
                moved += entry.nbytes
        return moved

    def fetch(self, entry: Offloaded) -> list[torch.Tensor]:
        """The entry's tensors on the device (prefetched, or copied now)."""
        if entry.device_copy is None:
            self._bring_back(entry)
        if entry.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(entry.ready)
            for t in entry.device_copy:
                t.record_stream(current)
            entry.ready = None
        return entry.device_copy

    def _bring_back(self, entry: Offloaded) -> None:
        if self.stream is None:
            entry.device_copy = [t.clone() for t in entry.host]
        else:
            with torch.cuda.stream(self.stream):
                entry.device_copy = [t.to(self.device, non_blocking=True) for t in entry.host]
                entry.ready = torch.cuda.Event()
                entry.ready.record(self.stream)
        entry.host = None
        self._on_move("host", "device", entry.nbytes)

    def forget(self) -> None:
        """Drop the per-pass index (entries still referenced by a graph stay alive)."""
        self._by_key.clear()
