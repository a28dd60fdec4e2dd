"""A checkpoint entry that this rank holds only ranges of: how ZeRO-1 shards enter DCP.

A parameter's optimizer state (and, with bf16, its fp32 master weights) is cut by
the shard boundaries of its bucket; each rank holds some flat ranges of it. In the
checkpoint the entry is ONE 1-D tensor of the parameter's numel, named by the
parameter's global name (`optim.<param>.<state>`), written as the chunks the ranks
hold:

    optim.layers.3.attn.q_up.weight.exp_avg   [12288]   (a 3 x 4096 matrix, flattened)
        rank 0 writes [0, 5000)   rank 1 writes [5000, 12288)        (saved with dp=2)
        rank 0 reads  [0, 3000)   ... rank 3 reads [9000, 12288)     (loaded with dp=4)

torch.distributed.checkpoint reads whatever saved chunks overlap the ranges a rank
asks for, so a checkpoint saved with one layout loads into any other, and a single
process can read the entry as a plain 1-D tensor. No rank ever holds a whole moment.

DCP learns about the ranges through its `_Checkpointable` hooks
(`__create_write_items__`, `__create_chunk_list__`, `__get_tensor_shard__`); the
trainer's planner looks up pieces through `__get_tensor_shard__` because DCP's default
lookup only knows tensors. The tensors are views into the optimizer's own buffers:
saving copies nothing up front, loading writes straight into the shards.
"""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType


class FlatChunks:
    """Ranges ``[offset, offset + len(t))`` of a 1-D tensor of ``numel`` elements."""

    def __init__(self, numel: int, pieces: list[tuple[int, torch.Tensor]]):
        for offset, tensor in pieces:
            if tensor.dim() != 1 or not 0 <= offset <= offset + tensor.numel() <= numel:
                raise ValueError(f"piece at {offset} of {tuple(tensor.shape)} does not fit a "
                                 f"flat tensor of {numel} elements")
        self.numel = numel
        self.pieces = {int(offset): tensor for offset, tensor in pieces}

    def size(self) -> torch.Size:
        """The whole entry's size (DCP compares it with the saved one)."""
        return torch.Size([self.numel])

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        del obj
        return [WriteItem(index=MetadataIndex(fqn, torch.Size([offset])),
                          type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size([offset]),
                                                         sizes=tensor.size()),
                              properties=TensorProperties.create_from_tensor(tensor),
                              size=self.size()))
                for offset, tensor in self.pieces.items()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size([offset]), sizes=tensor.size())
                for offset, tensor in self.pieces.items()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        if index.offset is None or int(index.offset[0]) not in self.pieces:
            raise ValueError(f"{index.fqn}: this rank holds no piece at {index.offset}")
        return self.pieces[int(index.offset[0])]


def _window(chunks: FlatChunks, start: int, numel: int) -> FlatChunks:
    """The part of `chunks` in [start, start + numel), as an entry of `numel` elements
    (views: writing them writes the shards)."""
    pieces = []
    for offset, tensor in chunks.pieces.items():
        lo, hi = max(offset, start), min(offset + tensor.numel(), start + numel)
        if lo < hi:
            pieces.append((lo - start, tensor[lo - offset:hi - offset]))
    return FlatChunks(numel, pieces)


def split_grouped(per_param: dict, experts: dict[str, list[str]]) -> dict:
    """Checkpoint entries by parameter name -> by global name: a grouped expert parameter
    (`[E_local, out, in]`, named in `experts`: model/param_names.expert_entry_names) becomes
    one entry per expert, so checkpoints stay independent of the EP size. Values are a
    tensor shaped like the parameter (split on dim 0), a flat tensor of its numel or
    `FlatChunks` (cut into E equal runs: an expert's weights are contiguous), or a dict of
    those by state kind. Every result is a view."""
    out = {}
    for name, value in per_param.items():
        names = experts.get(name)
        if names is None:
            out[name] = value
        elif isinstance(value, dict):
            for kind, entry in value.items():
                for global_name, part in split_grouped({name: entry}, experts).items():
                    out.setdefault(global_name, {})[kind] = part
        elif isinstance(value, FlatChunks):
            each = value.numel // len(names)
            out.update((n, _window(value, i * each, each)) for i, n in enumerate(names))
        elif value.dim() == 1:
            out.update(zip(names, value.unflatten(0, (len(names), -1)).unbind(0)))
        else:
            out.update(zip(names, value.unbind(0)))
    return out
