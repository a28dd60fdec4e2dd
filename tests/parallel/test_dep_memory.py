"""DEP keeps stage 0's activation memory independent of image sizes; colocated does not.

Two microbatches with the same token layout: an image of 8x8 patches, and a
4-frame chunk of 8x8 patches (4x the pixels, the same 16 merged tokens). The
bytes autograd saves during stage 0's forward must be identical under DEP (it
only receives embeddings) and grow with the pixels when the encoder runs on
stage 0 (colocated).
"""
import torch

from model.config import preset
from model.init import initialize
from model.inputs import ModelInputs
from model.lm import ChunkSpec, LanguageModelChunk
from model.vision_language import VisionEncoder
from parallel.activation_memory import SavedTensorBytes
from parallel.engine import StageModule

torch.set_num_threads(1)


def microbatch(frames: int) -> ModelInputs:
    S, tokens = 32, 16
    ids = torch.full((1, S), 5, dtype=torch.long)
    ids[0, 2:2 + tokens] = 1
    patches = torch.randn(frames * 64, preset("tiny").vision.patch_dim)
    return ModelInputs(ids, torch.arange(S).unsqueeze(0), torch.zeros(1, S, dtype=torch.long),
                       torch.full((1, S), -100), patches, [(frames, 8, 8)],
                       torch.arange(2, 2 + tokens))


def stage0_saved_bytes(mode: str, frames: int) -> int:
    cfg = preset("tiny")
    lm = LanguageModelChunk(cfg.lm, ChunkSpec(embed=True, layers=range(0, 1), head=False))
    vision = VisionEncoder(cfg)
    stage = StageModule(lm, vision if mode == "colocated" else None)
    initialize(stage, 0)
    initialize(vision, 0, prefix="vision")
    inputs = microbatch(frames)
    embeds = None
    if mode == "dep":  # what DEP hands stage 0: the encoder output as a leaf
        with torch.no_grad(), SavedTensorBytes() as encoder_saved:
            rows = vision(inputs.patches, inputs.grid_thw)
        assert encoder_saved.bytes == 0  # the balanced forward keeps no activations
        embeds = rows.clone().requires_grad_()
    with SavedTensorBytes(exclude=[embeds] if embeds is not None else None) as saved:
        stage(inputs.tokens, inputs, embeds)
    return saved.bytes


def test_stage0_memory_independent_of_image_size_under_dep():
    dep_image, dep_video = stage0_saved_bytes("dep", 1), stage0_saved_bytes("dep", 4)
    col_image, col_video = stage0_saved_bytes("colocated", 1), stage0_saved_bytes("colocated", 4)
    assert dep_image == dep_video
    assert col_video > col_image + 3 * 64 * preset("tiny").vision.hidden * 4  # >= 4x pixels' worth
    assert col_image > dep_image
