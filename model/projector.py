"""The MLP projector: one 2x2 group of vision features -> one LM embedding.

    merged_MKD [M, 4, D_vis] --LayerNorm(D_vis)--> flatten [M, 4*D_vis]
        --Linear(4D, 4D)--GELU--Linear(4D, lm_hidden)--> [M, lm_hidden]

The norm runs per patch before the flatten, so each of the four patches enters the MLP
on the same scale whatever its position in the group (Kimi-VL's projector layout).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from model.norm import LayerNorm

INIT_STD = 0.02


class Projector(nn.Module):
    def __init__(self, vision_hidden: int, lm_hidden: int, merge_group: int = 4, eps: float = 1e-5):
        super().__init__()
        if vision_hidden <= 0 or lm_hidden <= 0 or merge_group <= 0:
            raise ValueError(f"Projector sizes must be positive, got vision_hidden={vision_hidden}, "
                             f"lm_hidden={lm_hidden}, merge_group={merge_group}")
        self.vision_hidden, self.merge_group = vision_hidden, merge_group
        group_dim = merge_group * vision_hidden
        self.norm = LayerNorm(vision_hidden, eps=eps)
        self.fc1 = nn.Linear(group_dim, group_dim, bias=True)
        self.fc2 = nn.Linear(group_dim, lm_hidden, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear weights normal(0, 0.02), biases zero, LayerNorm identity; caller seeds torch."""
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        for linear in (self.fc1, self.fc2):
            nn.init.normal_(linear.weight, std=INIT_STD)
            nn.init.zeros_(linear.bias)

    def forward(self, merged_MKD: Tensor) -> Tensor:
        if merged_MKD.dim() != 3 or tuple(merged_MKD.shape[1:]) != (self.merge_group,
                                                                     self.vision_hidden):
            raise ValueError(
                f"Projector input has shape {tuple(merged_MKD.shape)}, expected "
                f"[M, {self.merge_group}, {self.vision_hidden}] (the encoder's merged groups)")
        grouped_MG = self.norm(merged_MKD).flatten(1)
        return self.fc2(F.gelu(self.fc1(grouped_MG)))
