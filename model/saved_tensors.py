"""Runs a memory policy (model/memory_policy.py): saved-tensor hooks per region, recompute,
FP8, offload, and the byte accounting of all of it.

    layer.memory.region("q_up", fn, *inputs)
        recompute?  yes: torch.utils.checkpoint (non-reentrant): only the inputs are saved
                         (through the hooks below, under the region's name), the rest runs
                         again in the backward, inside the same autograd graph, so the
                         gradients are accumulated in the same order as when everything
                         is stored: recompute is bitwise equal to store-all
                    no:  fn runs inside the region's hooks
    pack(tensor)    parameter (or a view of one)    -> untouched, not counted
                    fp8 region, floating tensor     -> Fp8Tensor (payload + scale)
                    offload region                  -> OffloadPool (host), FP8 first if both
                    otherwise                       -> stored as is (a detached alias)
    unpack          the inverse: fetch from the pool, dequantise

Only the innermost `saved_tensors_hooks` pair runs, so every region installs the same
pack/unpack bound to its own name; a layer's code outside any named region runs inside
`layer()` (region "other"). Regions never nest, so a recomputed region's internals are
saved by checkpoint's own hooks (and recomputed), never by ours.

Accounting (what a GPU allocator would show, without one):
    saved[layer][region]   bytes kept for backward by the last forward of each layer, as
                           stored (1 byte per element for FP8 payloads), device + host
    live / peak            bytes alive now and at most since `reset_peak`, "device" (stored,
                           FP8, prefetched) and "host" (offloaded): a storage saved by
                           several ops counts once; freed when autograd drops the last
                           saved reference (after the backward of the op that saved it)
Tensors that a recomputation saves in the backward are checkpoint's, not counted here.

`inside_region()` is true while a recomputable region runs (forward or recompute): the
expert all-to-all refuses to start then (parallel/expert_dispatch.py), so a policy can
never recompute communication.
"""
from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Hashable
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.fp8 import Fp8Tensor, dequantise, quantise
from model.memory_policy import REGIONS, MemoryPolicy
from model.offload import Offloaded, OffloadPool

_state = threading.local()


def inside_region() -> str | None:
    """The recomputable region running now on this thread, or None."""
    return getattr(_state, "region", None)


def first_run_of_recomputed_region() -> bool:
    """True during the forward of a recomputed region, whose saved tensors are dropped:
    code that computes something only for its backward (the fused loss's gradients) can
    skip it then and do it in the recomputation."""
    return getattr(_state, "first_run", False)


@contextmanager
def _recomputable(name: str, first_run: bool):
    outer = inside_region(), first_run_of_recomputed_region()
    _state.region, _state.first_run = name, first_run
    try:
        yield
    finally:
        _state.region, _state.first_run = outer


class _Stored:
    """A tensor kept as is; counts its storage once however many ops save it."""

    __slots__ = ("tensor", "key", "__weakref__")

    def __init__(self, tensor: torch.Tensor, key: int):
        self.tensor, self.key = tensor, key


class _Compressed:
    __slots__ = ("fp8", "nbytes", "on_free", "__weakref__")

    def __init__(self, fp8: Fp8Tensor, on_free: Callable[[int], None]):
        self.fp8, self.nbytes, self.on_free = fp8, fp8.nbytes, on_free

    def __del__(self) -> None:
        self.on_free(self.nbytes)


class ActivationMemory:
    """One per rank (or process): the policy, its offload pool and its accounting."""

    def __init__(self, policy: MemoryPolicy, device: torch.device | str = "cpu"):
        self.policy = policy
        self.pool = OffloadPool(torch.device(device), self._move)
        self.live = {"device": 0, "host": 0}
        self.peak = dict(self.live)
        self.saved: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.prefetched_bytes = 0
        self._storages: dict[int, list[int]] = {}  # storage ptr -> [holders, bytes]
        self._params: set[int] = set()
        self._layer_types: dict[str, str] = {}  # layer name -> its layer type
        self._key: Hashable = None

    # ------------------------------------------------------------------ binding

    def attach(self, module: nn.Module, prefix: str = "") -> None:
        """Give every memory-aware submodule its layer's binding; parameters are noted so
        that no treatment ever touches them."""
        from model.lm import DecoderLayer, LanguageModelChunk
        from model.vision import VisionBlock
        self._params |= {p.untyped_storage().data_ptr() for p in module.parameters()}
        for name, sub in module.named_modules(prefix=prefix):
            if isinstance(sub, DecoderLayer):
                layer = int(name.rsplit(".", 1)[-1])
                binding = LayerMemory(self, "moe" if sub.is_moe else "dense", name, layer)
                sub.memory = sub.attn.memory = sub.ffn.memory = binding
            elif isinstance(sub, VisionBlock):
                sub.memory = LayerMemory(self, "vision", name)
            elif isinstance(sub, LanguageModelChunk) and sub.head is not None:
                sub.memory = LayerMemory(self, "head", f"{name}.head" if name else "head")

    def refresh_parameters(self, modules: list[nn.Module]) -> None:
        """Note the parameters again after ZeRO-1 rebound them to its flat buffers."""
        self._params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}

    @contextmanager
    def pass_of(self, key: Hashable):
        """Tensors offloaded inside belong to pass `key` (what `prefetch(key)` brings back)."""
        outer, self._key = self._key, key
        try:
            yield
        finally:
            self._key = outer

    def prefetch(self, key: Hashable) -> None:
        self.prefetched_bytes += self.pool.prefetch(key)

    def start_step(self) -> None:
        """Per-step figures start over: peaks, bytes saved, bytes prefetched."""
        self.peak = dict(self.live)
        self.saved.clear()
        self.prefetched_bytes = 0
        self.pool.forget()
        if self.pool.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.pool.device)

    def step_stats(self, forwards: int) -> dict[str, float]:
        """The step's figures for the metrics, in MiB: the language model's saved bytes per
        forward of a chunk (device + host, as stored), the encoder's over the step, this
        process's peak of saved-tensor bytes on the device and in the host pool, what was
        prefetched; on CUDA the allocator's peak."""
        mib = 1 / 2**20

        def total(vision: bool) -> int:
            return sum(sum(regions.values()) for name, regions in self.saved.items()
                       if (self._layer_types[name] == "vision") == vision)
        stats = {"act_saved_per_microbatch_MiB": total(False) / max(forwards, 1) * mib,
                 # the vision encoder's saved bytes over the step: colocated, its forwards;
                 # DEP, its recomputation with grad after the pipeline (parallel/dep.py)
                 "act_saved_encoder_MiB": total(True) * mib,
                 "act_peak_device_MiB": self.peak["device"] * mib,
                 "act_peak_host_MiB": self.peak["host"] * mib,
                 "act_prefetched_MiB": self.prefetched_bytes * mib}
        if self.pool.device.type == "cuda":
            stats["cuda_max_allocated_MiB"] = torch.cuda.max_memory_allocated(
                self.pool.device) * mib
        return stats

    # ------------------------------------------------------------------ accounting

    def _move(self, src: str, dst: str, nbytes: int) -> None:
        if src:
            self.live[src] -= nbytes
        if dst:
            self.live[dst] += nbytes
            self.peak[dst] = max(self.peak[dst], self.live[dst])

    def _release_storage(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            self._move("device", "", entry[1])

    def is_parameter(self, tensor: torch.Tensor) -> bool:
        return (isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)
                or tensor.untyped_storage().data_ptr() in self._params)

    # ------------------------------------------------------------------ hooks

    def hooks(self, layer: "LayerMemory", region: str):
        recompute, fp8, offload = self.policy.treatment(layer.layer_type, region, layer.index)
        saved = self.saved[layer.name]
        self._layer_types[layer.name] = layer.layer_type

        # the copies (FP8 and/or offloaded) of this region by the bytes they read; holding each
        # tensor keeps its storage (and so its address) from being reused while the region
        # runs, so a later save with the same key is the same bytes: one copy, not one per save
        # (the experts' gate and up products save the same input). Emptied when the region ends:
        # until then its offloaded tensors stay on the device too (one region's worth at most).
        stashed: dict[tuple, tuple[torch.Tensor, object]] = {}

        def pack(tensor: torch.Tensor):
            if self.is_parameter(tensor):
                return tensor
            compress = fp8 and tensor.is_floating_point()
            if compress or offload:
                key = _bytes_read(tensor, rows=compress and self.policy.fp8_scaling == "row")
                if key not in stashed:  # else saved again by another op of this region
                    stashed[key] = (tensor, copy(tensor, compress))
                return (stashed[key][1], tensor.shape)
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self._storages:
                self._storages[key][0] += 1
            else:
                self._storages[key] = [1, storage.nbytes()]
                self._move("", "device", storage.nbytes())
                saved[region] += storage.nbytes()
            holder = _Stored(tensor.detach(), key)
            weakref.finalize(holder, self._release_storage, key)
            return holder

        def copy(tensor: torch.Tensor, compress: bool):
            """The region's one copy of these bytes: FP8 and/or in the offload pool."""
            payload = quantise(tensor, self.policy.fp8_scaling) if compress else None
            if offload:
                parts = [payload.payload, payload.scale] if compress else [tensor.detach()]
                entry = self.pool.stash(parts, self._key)
                saved[region] += entry.nbytes
                return (entry, payload)
            self._move("", "device", payload.nbytes)
            saved[region] += payload.nbytes
            return _Compressed(payload, lambda n: self._move("device", "", n))

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            if isinstance(packed, _Stored):
                return packed.tensor
            copied, shape = packed
            if isinstance(copied, _Compressed):
                tensor = dequantise(copied.fp8)
            else:
                entry, payload = copied
                parts = self.pool.fetch(entry)
                tensor = parts[0] if payload is None else dequantise(
                    Fp8Tensor(parts[0], parts[1], payload.dtype))
            # (a contiguous copy: another op may have saved a reshape of the same elements)
            return tensor if tensor.shape == shape else tensor.view(shape)

        return recompute, _hooks_of_one_region(pack, unpack, stashed)


def _bytes_read(tensor: torch.Tensor, rows: bool) -> tuple:
    """Which bytes a tensor reads, as a key: storage address, dtype, offset and, for a
    contiguous tensor, its element count (every reshape of the same run of elements is the
    same copy: softmax saves attention probabilities as [B, H, S, S], the product with v
    as [B*H, S, S]) and, when `rows` (FP8 scales per row), its row length; otherwise its
    shape and strides."""
    where = (tensor.untyped_storage().data_ptr(), tensor.dtype, tensor.storage_offset())
    if tensor.is_contiguous():
        return (*where, tensor.numel(), tensor.shape[-1] if rows and tensor.dim() else None)
    return (*where, tuple(tensor.shape), tuple(tensor.stride()))


@contextmanager
def _hooks_of_one_region(pack, unpack, stashed: dict):
    """The region's saved-tensor hooks; on leaving it, drop its references to the tensors it
    stashed (the graph keeps the hooks, so the device tensors would live until the backward)."""
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        stashed.clear()


class LayerMemory:
    """One layer's view of the policy: `region(name, fn, *inputs)` and `layer()`."""

    def __init__(self, memory: ActivationMemory, layer_type: str, name: str,
                 index: int | None = None):
        self.memory, self.layer_type, self.name, self.index = memory, layer_type, name, index

    def layer(self):
        """Around a layer's code outside named regions (region "other")."""
        if "other" not in REGIONS[self.layer_type]:
            return nullcontext()
        return self.memory.hooks(self, "other")[1]

    def region(self, name: str, fn: Callable, *inputs):
        recompute, hooks = self.memory.hooks(self, name)
        with hooks:
            if not recompute:
                return fn(*inputs)

            runs = []

            def run(*args):  # called once in the forward, again in the backward
                runs.append(None)
                with _recomputable(f"{self.layer_type}.{name}", first_run=len(runs) == 1):
                    return fn(*args)
            # determinism_check off: the fused loss saves placeholders in its first run
            return checkpoint(run, *inputs, use_reentrant=False, preserve_rng_state=False,
                              determinism_check="none")


class StoreAll:
    """The binding of a module without a policy: plain calls, no hooks (the default)."""

    @staticmethod
    def layer():
        return nullcontext()

    @staticmethod
    def region(name: str, fn: Callable, *inputs):
        return fn(*inputs)


STORE_ALL = StoreAll()


