"""Measure the bytes autograd keeps for backward: the activation memory a forward costs.

    with SavedTensorBytes() as saved:
        loss = stage(x)
    saved.bytes   # unique storages saved for backward (parameters excluded)

Parameters and views of them (a linear saves `weight.t()`) are excluded: they live
anyway. A storage saved by several ops is counted once, in full: a saved view of a
larger tensor (e.g. a microbatch's tokens sliced from the replica's batch) counts that
whole storage. This is how memory policies (DEP, recomputation, FP8, offload)
are compared without a GPU allocator.
"""
from __future__ import annotations

import torch


class SavedTensorBytes:
    def __init__(self, exclude: list[torch.Tensor] | None = None):
        self._exclude = {t.untyped_storage().data_ptr() for t in (exclude or [])}
        self._seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter):
            return tensor
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen and key not in self._exclude:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
