"""What one forward of the model takes: plain tensors and lists, no loader types."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelInputs:
    tokens: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]
    doc_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S], already shifted, -100 where no loss
    patches: torch.Tensor | None  # [N, patch_dim]: all media of these rows, concatenated
    grid_thw: list[tuple[int, int, int]]
    media_index: torch.Tensor  # [M] flat placeholder positions (row * S + column), media order
