"""Model configuration and the presets `tiny`, `small` and `k25`.

Every size of the network lives here, in typed dataclasses validated in one
place (`ModelConfig.validate`). The presets are the only named sizes; a job
config picks one with `--model.preset` and may override single fields.

`k25` carries the published Kimi K2 / K2.5 sizes. It is only ever counted
(`model.param_count`), never instantiated on CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says what to change."""


@dataclass
class VisionConfig:
    """MoonViT-3D encoder (SigLIP-style ViT with NaViT packing) and its projector."""

    patch_size: int = 14  # pixels per side of a square patch
    in_channels: int = 3  # colour channels of a pixel
    hidden: int = 128  # width of the ViT's residual stream
    layers: int = 2  # transformer blocks
    heads: int = 4  # attention heads (hidden / heads must be divisible by 4 for 2D RoPE)
    mlp_hidden: int = 512  # inner width of each block's GELU MLP
    pos_emb_height: int = 16  # rows of the learnable 2D position table (resized per image)
    pos_emb_width: int = 16  # columns of the learnable 2D position table
    max_frames: int = 4  # frames per spatiotemporal chunk
    merge_kernel: int = 2  # 2x2 spatial patch merger
    rope_theta: float = 10000.0  # base of the 2D RoPE frequencies
    norm_eps: float = 1e-6  # LayerNorm epsilon (the published MoonViT: 1e-5, see preset k25)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size * self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class LMConfig:
    """Kimi K2 / DeepSeek-V3 style MoE language model with MLA attention."""

    vocab_size: int = 2048  # token ids of the embedding and the head
    hidden: int = 256  # width of the residual stream
    layers: int = 4  # decoder layers (the first first_k_dense dense, the rest MoE)
    heads: int = 4  # attention heads
    # MLA
    q_lora_rank: int = 96  # MLA: rank of the low-rank query projection
    kv_lora_rank: int = 64  # MLA: width of the compressed key/value latent
    qk_nope_head_dim: int = 32  # MLA: query/key dims per head without RoPE
    qk_rope_head_dim: int = 16  # MLA: query/key dims per head with RoPE (even)
    v_head_dim: int = 32  # MLA: value dims per head
    rope_theta: float = 50000.0  # base of the RoPE frequencies
    yarn_factor: float = 0.0  # YaRN: context extension over yarn_original_max_position (0: off)
    yarn_original_max_position: int = 4096  # YaRN: context length before extension
    yarn_beta_fast: float = 32.0  # YaRN: rotations where interpolation ramps out
    yarn_beta_slow: float = 1.0  # YaRN: rotations where interpolation ramps in
    yarn_mscale: float = 1.0  # YaRN: attention temperature scale
    yarn_mscale_all_dim: float = 1.0  # YaRN: temperature scale over all dims
    # FFN / MoE
    first_k_dense: int = 1  # leading layers with a dense SwiGLU instead of experts
    dense_hidden: int = 768  # inner width of the dense SwiGLU
    num_experts: int = 16  # routed experts per MoE layer
    top_k: int = 4  # routed experts per token
    num_shared_experts: int = 1  # experts every token goes through
    expert_hidden: int = 128  # inner width of each expert's SwiGLU
    routed_scaling_factor: float = 2.5  # scale of the normalised top-k router weights
    # group-limited routing (DeepSeek-V3 n_group / topk_group; equal values, as Kimi K2's
    # 1 / 1, let every group compete: plain top-k)
    router_groups: int = 1  # the experts form this many equal groups
    router_topk_groups: int = 1  # a token picks its experts from its best this-many groups
    bias_update_rate: float = 1e-3  # aux-loss-free balancing: bias step per update
    norm_eps: float = 1e-6  # epsilon of the layer and final RMSNorms
    # the published DeepSeek-V3 / Kimi code builds q_norm, kv_norm with its RMSNorm default
    # 1e-6 whatever rms_norm_eps says (K2.5: rms_norm_eps 1e-5)
    latent_norm_eps: float = 1e-6  # epsilon of MLA's latent RMSNorms (q_norm, kv_norm)
    init_std: float = 0.02  # standard deviation of the initial matrices and tables

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.layers - self.first_k_dense


@dataclass
class ModelConfig:
    preset: str = "tiny"  # named sizes: tiny, small or k25; other model keys override them
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    # token id of the media placeholder in the LM vocabulary
    media_token_id: int = 1
    # transformer-engine kernels (fused attention, norm+linear) on CUDA; needs the [gpu] extra
    te: bool = False

    def validate(self) -> None:
        """Refuse sizes that cannot build, each with what to change."""
        lm, v = self.lm, self.vision
        positive = {
            "model.lm.vocab_size": lm.vocab_size, "model.lm.hidden": lm.hidden,
            "model.lm.layers": lm.layers, "model.lm.heads": lm.heads,
            "model.lm.q_lora_rank": lm.q_lora_rank, "model.lm.kv_lora_rank": lm.kv_lora_rank,
            "model.lm.qk_nope_head_dim": lm.qk_nope_head_dim,
            "model.lm.qk_rope_head_dim": lm.qk_rope_head_dim, "model.lm.v_head_dim": lm.v_head_dim,
            "model.lm.dense_hidden": lm.dense_hidden, "model.lm.expert_hidden": lm.expert_hidden,
            "model.lm.top_k": lm.top_k, "model.vision.hidden": v.hidden,
            "model.vision.layers": v.layers, "model.vision.heads": v.heads,
            "model.vision.mlp_hidden": v.mlp_hidden, "model.vision.patch_size": v.patch_size,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if lm.qk_rope_head_dim % 2:
            raise ConfigError(
                f"model.lm.qk_rope_head_dim={lm.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if not 0 <= lm.first_k_dense <= lm.layers:
            raise ConfigError(
                f"model.lm.first_k_dense={lm.first_k_dense} must lie in [0, model.lm.layers={lm.layers}]")
        if lm.num_moe_layers > 0 and lm.num_experts < lm.top_k:
            raise ConfigError(
                f"model.lm.num_experts={lm.num_experts} is smaller than model.lm.top_k={lm.top_k}: "
                "raise num_experts or lower top_k")
        if not 1 <= lm.router_topk_groups <= lm.router_groups:
            raise ConfigError(
                f"model.lm.router_topk_groups={lm.router_topk_groups} must lie in "
                f"[1, model.lm.router_groups={lm.router_groups}]")
        if lm.router_topk_groups < lm.router_groups:
            per_group, rem = divmod(lm.num_experts, lm.router_groups)
            if rem or per_group < 2:
                raise ConfigError(
                    f"model.lm.num_experts={lm.num_experts} must split into "
                    f"model.lm.router_groups={lm.router_groups} equal groups of at least 2 "
                    "(a group scores by its two best experts)")
            if lm.top_k > lm.router_topk_groups * per_group:
                raise ConfigError(
                    f"model.lm.top_k={lm.top_k} exceeds the {lm.router_topk_groups} x {per_group} "
                    "experts of the eligible groups: raise router_topk_groups")
        if lm.num_shared_experts < 0:
            raise ConfigError("model.lm.num_shared_experts must be >= 0")
        if not 0 <= self.media_token_id < lm.vocab_size:
            raise ConfigError(
                f"model.media_token_id={self.media_token_id} must be a token id below "
                f"model.lm.vocab_size={lm.vocab_size}")
        if v.hidden % v.heads:
            raise ConfigError(
                f"model.vision.hidden={v.hidden} is not divisible by model.vision.heads={v.heads}")
        if v.head_dim % 4:
            raise ConfigError(
                f"model.vision head dim {v.head_dim} (hidden/heads) must be divisible by 4 "
                "for 2D RoPE (half for rows, half for columns, in pairs)")
        if v.hidden % 2:
            raise ConfigError("model.vision.hidden must be even (sinusoidal time embedding)")
        if not 1 <= v.max_frames <= 4:
            raise ConfigError(f"model.vision.max_frames={v.max_frames} must be in 1..4")
        if v.merge_kernel != 2:
            raise ConfigError("model.vision.merge_kernel must be 2 (the 2x2 patch merger)")


def _tiny() -> ModelConfig:
    return ModelConfig(preset="tiny", lm=LMConfig(), vision=VisionConfig())


def _small() -> ModelConfig:
    """A few hundred million parameters: for GPU benchmarks."""
    lm = LMConfig(
        vocab_size=32768, hidden=1024, layers=12, heads=16, q_lora_rank=384, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, first_k_dense=1,
        dense_hidden=4096, num_experts=32, top_k=4, num_shared_experts=1, expert_hidden=512,
    )
    vision = VisionConfig(hidden=512, layers=6, heads=8, mlp_hidden=2048,
                          pos_emb_height=32, pos_emb_width=32)
    return ModelConfig(preset="small", lm=lm, vision=vision)


def _k25() -> ModelConfig:
    """Published Kimi K2.5 sizes (moonshotai/Kimi-K2.5 config.json): the Kimi K2 LM with
    K2.5's long-context YaRN (factor 64 over 4096 = the report's 262144 tokens, beta_fast
    32) and norm eps 1e-5 (latent MLA norms 1e-6), and the MoonViT (SigLIP-SO-400M)
    encoder with LayerNorm eps 1e-5. tests/convert/test_hf_k25.py checks it field by field
    against that config.json."""
    lm = LMConfig(
        vocab_size=163840, hidden=7168, layers=61, heads=64, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, first_k_dense=1,
        dense_hidden=18432, num_experts=384, top_k=8, num_shared_experts=1, expert_hidden=2048,
        routed_scaling_factor=2.827, yarn_factor=64.0, yarn_original_max_position=4096,
        yarn_beta_fast=32.0, yarn_beta_slow=1.0, norm_eps=1e-5, latent_norm_eps=1e-6,
    )
    vision = VisionConfig(hidden=1152, layers=27, heads=16, mlp_hidden=4304,
                          pos_emb_height=64, pos_emb_width=64, norm_eps=1e-5)
    return ModelConfig(preset="k25", lm=lm, vision=vision, media_token_id=163605)


PRESETS = {"tiny": _tiny, "small": _small, "k25": _k25}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def model_config_from_dict(d: dict) -> ModelConfig:
    """The inverse of `dataclasses.asdict(cfg)` (a checkpoint's meta.json "model")."""
    unknown = set(d) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"model config has unknown keys {sorted(unknown)}")
    return ModelConfig(**{k: v for k, v in d.items() if k not in ("lm", "vision")},
                       lm=LMConfig(**d["lm"]), vision=VisionConfig(**d["vision"]))


def replace(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, **changes)
