"""The whole Kimi K2.5-style model: MoonViT-3D -> MLP projector -> MoE language model.

    patches (all media of the batch, NaViT-packed) ─MoonViT-3D─> merged 2x2 groups
        ─Projector─> media embeddings [M, D_lm] ─┐
    tokens ─embed──────────────────────────────> merge at placeholder positions ─> LM ─> logits

`VisionEncoder` (ViT + projector) is one unit because the Decoupled Encoder
Process replicates exactly this part on every rank. Single-process training
and the pipeline's colocated stage 0 both use `VisionLanguageModel`'s parts.
"""
from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.init import materialize
from model.lm import LanguageModelChunk
from model.projector import Projector
from model.vision import MoonViT3D


class VisionEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vit = MoonViT3D(cfg.vision, cfg.te)
        self.projector = Projector(cfg.vision.hidden, cfg.lm.hidden)

    def forward(self, patches_NP: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """[sum of merged tokens, D_lm] in media order."""
        return self.projector(self.vit(patches_NP, grid_thw))


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int = 0, device: torch.device | str = "cpu"):
        """Built on the meta device, then allocated on `device` and initialised by name."""
        super().__init__()
        self.cfg = cfg
        with torch.device("meta"):
            self.vision = VisionEncoder(cfg)
            self.lm = LanguageModelChunk(cfg.lm, te=cfg.te)
        materialize(self, device, seed, cfg.lm.init_std)

    def forward(self, tokens_BS, position_ids_BS, doc_ids_BS, patches_NP=None, grid_thw=None,
                media_index_M=None, labels_BS=None) -> torch.Tensor:
        """Logits [B, S, V], or with `labels_BS` the summed token cross-entropy."""
        media_embeds = None
        if grid_thw:
            media_embeds = self.vision(patches_NP, grid_thw)
        return self.lm(tokens_BS, position_ids_BS, doc_ids_BS, media_embeds, media_index_M,
                       labels_BS)
