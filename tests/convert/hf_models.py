"""Tiny Hugging Face checkpoints built with transformers (random weights), and our model
loaded from an imported checkpoint: what the conversion tests compare."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model.config import ModelConfig  # noqa: E402
from model.lm import LanguageModelChunk  # noqa: E402
from model.param_names import global_named_tensors  # noqa: E402
from trainer.checkpoint import read_tensors  # noqa: E402

YARN = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 8.0,
        "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_deepseek_config(yarn: bool = True, **changes):
    """Every code path of the LM: a dense first layer, MoE layers with a shared expert,
    MLA with a low-rank query, interleaved rope dims, optionally YaRN."""
    kwargs = dict(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16,
        qk_nope_head_dim=16, n_group=1, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, num_mtp_layers=0, routed_scaling_factor=2.5,
        rope_parameters=dict(YARN) if yarn else {"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False)
    kwargs.update(changes)
    return transformers.DeepseekV3Config(**kwargs)


def save_tiny_deepseek(path: Path, seed: int = 0, **changes) -> Path:
    """A random tiny DeepseekV3ForCausalLM saved as a Hugging Face checkpoint directory.
    Router biases are random too (transformers initialises them to zero)."""
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(tiny_deepseek_config(**changes)).float()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(path)
    return path


def hf_logits(path: Path, tokens_BS: torch.Tensor) -> torch.Tensor:
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=tokens_BS).logits


def our_lm(cfg: ModelConfig, checkpoint: Path) -> LanguageModelChunk:
    """Our whole LM with every tensor from `checkpoint` (and nothing left at its init)."""
    tensors = {k.removeprefix("model."): v for k, v in read_tensors(checkpoint).items()}
    lm = LanguageModelChunk(cfg.lm).float()
    targets = dict(global_named_tensors(lm, prefix="lm"))
    targets.update({n: b for n, b in lm.named_buffers(prefix="lm") if n.endswith("router.bias")})
    assert set(targets) == {k for k in tensors if k.startswith("lm.")}
    with torch.no_grad():
        for name, t in targets.items():
            t.copy_(tensors[name])
    return lm.eval()


def our_logits(lm: LanguageModelChunk, tokens_BS: torch.Tensor,
               doc_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of packed rows: positions restart at 0 in every document."""
    B, S = tokens_BS.shape
    if doc_ids_BS is None:
        doc_ids_BS = torch.zeros(B, S, dtype=torch.long)
    starts = torch.ones(B, S, dtype=torch.bool)
    starts[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    index = torch.arange(S).expand(B, S)
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(1).values
    with torch.no_grad():
        return lm(tokens_BS, index - last_start, doc_ids_BS)


def fp8_quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style block quantisation: (float8_e4m3fn q, fp32 scale per block), w ~ q * scale."""
    rows, cols = w.shape
    nr, nc = math.ceil(rows / block), math.ceil(cols / block)
    padded = torch.zeros(nr * block, nc * block)
    padded[:rows, :cols] = w
    blocks = padded.view(nr, block, nc, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).view(nr * block, nc * block)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale


# transformers 5.24 saves Kimi K2.5 with three names the release spells otherwise (its reverse
# renames overreach): the LM's layers come out as "blocks", the patch embedding lands under
# "encoder", the projector's norm keeps the in-memory "model." prefix. The release's names
# (moonshotai/Kimi-K2.5's safetensors index; Moonshot's and vLLM's loaders) are restored here.
K25_RELEASED_NAMES = (("language_model.model.blocks.", "language_model.model.layers."),
                      ("vision_tower.encoder.patch_embed.", "vision_tower.patch_embed."),
                      ("model.mm_projector.pre_norm.", "mm_projector.pre_norm."))


def tiny_k25_config(**text_changes):
    """A tiny Kimi K2.5: the LM of `tiny_deepseek_config` with K2.5's norm eps 1e-5 and YaRN,
    a 2-block MoonViT (head dim 8: two groups of row/column pairs) with an 8 x 8 table."""
    text = tiny_deepseek_config(rms_norm_eps=1e-5, **text_changes).to_dict()
    vision = dict(patch_size=14, pos_emb_height=8, pos_emb_width=8, pos_emb_time=4,
                  num_attention_heads=4, num_hidden_layers=2, hidden_size=32,
                  intermediate_size=48,
                  rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    return transformers.Kimi_K25Config(text_config=text, vision_config=vision,
                                       projection_hidden_size=32, tie_word_embeddings=False,
                                       image_token_id=1)  # synthetic data: < 4


def random_k25(seed: int = 0, **text_changes):
    """transformers' tiny Kimi K2.5 with EVERY tensor random at a scale that keeps
    activations O(1) (norm gains and biases too, so a swapped norm or bias shows)."""
    torch.manual_seed(seed)
    model = transformers.Kimi_K25ForConditionalGeneration(tiny_k25_config(**text_changes)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name and name.endswith("weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn_like(p))
            elif "position_embeddings" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
    model.set_attn_implementation("eager")  # as `load_k25`, so a reload computes bitwise alike
    return model.eval()


def save_tiny_k25(path: Path, seed: int = 0) -> tuple[Path, object]:
    """A random tiny Kimi K2.5 saved in the release's layout; returns (dir, the model)."""
    from safetensors.torch import load_file, save_file
    model = random_k25(seed)
    model.save_pretrained(path)
    for file in path.glob("*.safetensors"):
        tensors = load_file(file)
        renamed = {}
        for name, t in tensors.items():
            for old, new in K25_RELEASED_NAMES:
                if name.startswith(old):
                    name = new + name[len(old):]
            renamed[name] = t
        save_file(renamed, file, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    assert not index.exists()  # one file: nothing else names the tensors
    return path, model


def load_k25(path: Path):
    """transformers' Kimi K2.5 from a release-layout directory; refuses anything left out."""
    model, info = transformers.Kimi_K25ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def hf_media_embeddings(model, pixels_NP: torch.Tensor, grid_thw: list) -> torch.Tensor:
    """transformers' vision tower + projector on packed patches: [merged tokens, D_lm]."""
    grid = torch.tensor(grid_thw, dtype=torch.long)
    pixel_values = pixels_NP.reshape(-1, 3, 14, 14)
    with torch.no_grad():
        pooled = model.model.vision_tower(pixel_values, grid_thw=grid).pooler_output
        return model.model.mm_projector(pooled).squeeze(1)


def our_model(cfg: ModelConfig, checkpoint: Path):
    """Our whole VisionLanguageModel with every tensor from `checkpoint` (nothing left at init)."""
    from model.vision_language import VisionLanguageModel
    tensors = {k.removeprefix("model."): v for k, v in read_tensors(checkpoint).items()}
    model = VisionLanguageModel(cfg).float()
    targets = dict(global_named_tensors(model))
    targets.update({n: b for n, b in model.named_buffers() if n.endswith("router.bias")})
    assert set(targets) == set(tensors)
    with torch.no_grad():
        for name, t in targets.items():
            t.copy_(tensors[name])
    return model.eval()
