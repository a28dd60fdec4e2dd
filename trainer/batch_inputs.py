"""Turn a `Batch` (the loader's contract) into the tensors the model takes.

The model knows nothing of the batch dataclass (imports go one way): it gets
token tensors, the concatenated patches, the grids, and the flat placeholder
positions (row * S + column) where media embeddings go. This is where batch
tensors reach the device the model runs on, so it is where the loader's uint8
pixels become float model input (`normalize_patches`).
"""
from __future__ import annotations

import torch

from dataloader.batch import Batch, MediaItem, normalize_patches
from model.inputs import ModelInputs


def media_index(media: list[MediaItem], seq_len: int) -> torch.Tensor:
    parts = [m.row * seq_len + m.offset + torch.arange(m.num_tokens) for m in media]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def model_inputs(batch: Batch, with_patches: bool = True,
                 device: torch.device | str = "cpu") -> ModelInputs:
    """The tensors of `batch` for the model on `device` (media patches concatenated in list
    order). `with_patches=False` when the encoder does not run in the model (DEP, and
    pipeline stages after the first: those ranks' loaders decode no pixels)."""
    media = batch.media

    def put(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device, non_blocking=True)

    # uint8 to the device, float there (4x fewer bytes over the host-device link)
    patches = (normalize_patches(put(torch.cat([m.patches for m in media])))
               if media and with_patches else None)
    return ModelInputs(put(batch.tokens), put(batch.position_ids), put(batch.doc_ids),
                       put(batch.labels), patches, [m.grid_thw for m in media],
                       put(media_index(media, batch.seq_len)))
