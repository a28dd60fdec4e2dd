"""Our model config from a Hugging Face `config.json` (Kimi K2 / DeepSeek-V3 / Kimi K2.5) and back.

    HF config.json                                ModelConfig
    ───────────────────────────────────────────   ──────────────────────────────────────────
    DeepseekV3ForCausalLM (kimi_k2, deepseek_v3)   lm; vision: a preset's, initialised fresh
    KimiK25ForConditionalGeneration (kimi_k25)     lm from text_config, vision from
                                                   vision_config (+ the projector fields)

Every field that changes the computation is either mapped or checked; a value our
modules do not implement is refused with what it is and what we support, so a
checkpoint never loads into a network that computes something else. Fields that
change nothing here (token ids of bos/eos, `use_cache`, dtypes) are ignored; the
exporter keeps the source config.json (stored in the checkpoint's meta.json) and only
rewrites what we know, so they survive a round trip.

K2.5's vision_config comes in two spellings: the release's (Moonshot's remote code, vLLM:
`vt_hidden_size`, `init_pos_emb_height`, `projector_ln_eps`, ...) and transformers 5's
(`hidden_size`, `pos_emb_height`, top-level `projection_layer_norm_eps`, ...). Both are
read; the exporter writes both, so either reader finds its keys.

Known limits, refused: a full-rank query (q_lora_rank null,
DeepSeek-V2-Lite), tied embeddings, attention biases, quantisation other than FP8 blocks
(the released K2.5 stores its routed experts as INT4 compressed-tensors: not read), a
non-square vision position table (transformers' Kimi K2.5 assumes a square one).
Skipped: multi-token-prediction layers (their weights are not imported).
"""
from __future__ import annotations

from model.config import ConfigError, LMConfig, ModelConfig, VisionConfig, preset

LM_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
K25_ARCHITECTURE = "KimiK25ForConditionalGeneration"  # the release's; transformers: Kimi_K25...
# HF's MLA latent norms (q_a_layernorm, kv_a_layernorm) are built with the RMSNorm default
# eps, not rms_norm_eps (DeepSeek's and transformers' code alike): lm.latent_norm_eps
HF_LATENT_NORM_EPS = 1e-6
# MoonViT's LayerNorms (blocks, final) are nn.LayerNorm() with its default eps in the
# release and eps=1e-5 hard-coded in transformers; no config field names it
MOONVIT_NORM_EPS = 1e-5
PROJECTOR_NORM_EPS = 1e-5  # model/projector.py's default, the one VisionEncoder builds


def _refuse(what: str, value, supported: str) -> None:
    raise ConfigError(f"Hugging Face config: {what}={value!r} is not supported ({supported})")


def _require(hf: dict, key: str, expected, default=None) -> None:
    value = hf.get(key, default)
    if value != expected:
        _refuse(key, value, f"only {expected!r} is implemented")


def rope_fields(text: dict) -> dict:
    """LMConfig rope/YaRN fields from `rope_parameters` (transformers 5) or `rope_scaling` +
    `rope_theta` (the published configs, transformers 4)."""
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = params.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        _refuse("rope_theta", None, "the config must name the RoPE base")
    kind = params.get("rope_type", params.get("type", "default"))
    out = {"rope_theta": float(theta)}
    if kind == "default":
        return dict(out, yarn_factor=0.0)
    if kind != "yarn":
        _refuse("rope type", kind, "'default' and 'yarn' are implemented")
    if params.get("attention_factor") is not None:
        _refuse("rope attention_factor", params["attention_factor"],
                "YaRN's cos/sin scale must come from factor, mscale and mscale_all_dim")
    if not params.get("truncate", True):
        _refuse("rope truncate", False, "the correction range is always truncated")
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings")
    if factor is None or original is None:
        _refuse("yarn factor/original_max_position_embeddings", (factor, original),
                "both must be given")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):
        # transformers: cos/sin scaled by mscale(factor, 1), softmax unscaled; ours the same
        # with mscale 1 and mscale_all_dim 0 (mscale(factor, 0) = 1)
        mscale, mscale_all_dim = 1.0, 0.0
    return dict(out, yarn_factor=float(factor), yarn_original_max_position=int(original),
                yarn_beta_fast=float(params.get("beta_fast") or 32),
                yarn_beta_slow=float(params.get("beta_slow") or 1),
                yarn_mscale=float(mscale), yarn_mscale_all_dim=float(mscale_all_dim))


def lm_config_from_hf(text: dict) -> LMConfig:
    """LMConfig of a DeepseekV3-architecture `config.json` (or a K2.5 `text_config`)."""
    _require(text, "hidden_act", "silu", "silu")
    _require(text, "attention_bias", False, False)
    _require(text, "tie_word_embeddings", False, False)
    _require(text, "norm_topk_prob", True, True)
    _require(text, "scoring_func", "sigmoid", "sigmoid")
    _require(text, "topk_method", "noaux_tc", "noaux_tc")
    _require(text, "moe_layer_freq", 1, 1)
    if text.get("q_lora_rank") is None:
        _refuse("q_lora_rank", None, "MLA with a low-rank query (q_lora_rank > 0) only")
    heads = text["num_attention_heads"]
    if text.get("num_key_value_heads", heads) != heads:
        _refuse("num_key_value_heads", text["num_key_value_heads"],
                f"MLA has one key/value head per query head ({heads})")
    n_group, topk_group = text.get("n_group") or 1, text.get("topk_group") or 1
    eps = float(text.get("rms_norm_eps", 1e-6))
    if text.get("pretraining_tp", 1) != 1:
        _refuse("pretraining_tp", text["pretraining_tp"], "only 1")
    return LMConfig(
        vocab_size=text["vocab_size"], hidden=text["hidden_size"],
        layers=text["num_hidden_layers"], heads=heads, q_lora_rank=text["q_lora_rank"],
        kv_lora_rank=text["kv_lora_rank"], qk_nope_head_dim=text["qk_nope_head_dim"],
        qk_rope_head_dim=text["qk_rope_head_dim"], v_head_dim=text["v_head_dim"],
        first_k_dense=text.get("first_k_dense_replace", 0),
        dense_hidden=text["intermediate_size"], num_experts=text["n_routed_experts"],
        top_k=text["num_experts_per_tok"], num_shared_experts=text.get("n_shared_experts") or 0,
        expert_hidden=text["moe_intermediate_size"],
        router_groups=n_group, router_topk_groups=topk_group,
        routed_scaling_factor=float(text.get("routed_scaling_factor", 1.0)), norm_eps=eps,
        latent_norm_eps=HF_LATENT_NORM_EPS, init_std=float(text.get("initializer_range", 0.02)), **rope_fields(text))


def is_vlm(hf: dict) -> bool:
    return "text_config" in hf and "vision_config" in hf


# ours: (the release's key, transformers' key) in vision_config
_VISION_KEYS = {
    "hidden": ("vt_hidden_size", "hidden_size"),
    "layers": ("vt_num_hidden_layers", "num_hidden_layers"),
    "heads": ("vt_num_attention_heads", "num_attention_heads"),
    "mlp_hidden": ("vt_intermediate_size", "intermediate_size"),
    "pos_emb_height": ("init_pos_emb_height", "pos_emb_height"),
    "pos_emb_width": ("init_pos_emb_width", "pos_emb_width"),
    "max_frames": ("init_pos_emb_time", "pos_emb_time"),
}
# what our encoder and projector compute, in the release's vision_config words
_VISION_FIXED = {"pos_emb_type": "divided_fixed", "video_attn_type": "spatial_temporal",
                 "merge_type": "sd2_tpool", "mm_projector_type": "patchmerger",
                 "projector_hidden_act": "gelu", "hidden_act": "gelu_pytorch_tanh"}


def vision_config_from_hf(hf: dict) -> VisionConfig:
    """VisionConfig of a K2.5 config.json (its vision_config and top-level projector fields)."""
    vision = hf["vision_config"]
    sizes = {}
    for ours, keys in _VISION_KEYS.items():
        value = next((vision[k] for k in keys if vision.get(k) is not None), None)
        if value is None:
            _refuse(f"vision_config {keys[0]} / {keys[1]}", None, "the config must give it")
        sizes[ours] = int(value)
    for key, expected in _VISION_FIXED.items():
        if key in vision and vision[key] != expected:
            _refuse(f"vision_config {key}", vision[key], f"only {expected!r} is implemented")
    if list(vision.get("merge_kernel_size", [2, 2])) != [2, 2]:
        _refuse("vision_config merge_kernel_size", vision["merge_kernel_size"], "only [2, 2]")
    if sizes["pos_emb_height"] != sizes["pos_emb_width"]:
        _refuse("vision position table", (sizes["pos_emb_height"], sizes["pos_emb_width"]),
                "transformers' Kimi K2.5 resizes a square table only")
    in_channels = vision.get("num_channels", 3)
    if in_channels != 3:
        _refuse("vision_config num_channels", in_channels, "RGB (3) only")
    for key, value in (("projector_ln_eps", vision.get("projector_ln_eps")),
                       ("projection_layer_norm_eps", hf.get("projection_layer_norm_eps"))):
        if value is not None and float(value) != PROJECTOR_NORM_EPS:
            _refuse(key, value, f"our projector's LayerNorm uses {PROJECTOR_NORM_EPS}")
    for key, value in (("mm_hidden_size", vision.get("mm_hidden_size")),
                       ("projection_hidden_size", hf.get("projection_hidden_size"))):
        if value is not None and value != sizes["hidden"]:
            _refuse(key, value, f"the projector normalises the encoder width {sizes['hidden']}")
    rope = vision.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        _refuse("vision rope type", rope["rope_type"], "'axial' 2D RoPE only")
    theta = rope.get("rope_theta", vision.get("rope_theta", 10000.0))
    return VisionConfig(patch_size=int(vision.get("patch_size", 14)), in_channels=in_channels,
                        rope_theta=float(theta), norm_eps=MOONVIT_NORM_EPS, **sizes)


def model_config_from_hf(hf: dict, vision_preset: str = "k25",
                         media_token_id: int | None = None) -> ModelConfig:
    """The ModelConfig of an HF `config.json`. LM-only (DeepseekV3): its LM, and the vision
    encoder (and projector) of `vision_preset`, initialised fresh by the trainer. K2.5: both
    from the config, the media placeholder its `media_placeholder_token_id` /
    `image_token_id`. `media_token_id` overrides the placeholder (Kimi K2's tokenizer
    reserves 163605 for it)."""
    if is_vlm(hf):
        if hf.get("model_type") != "kimi_k25":
            _refuse("model_type", hf.get("model_type"), "'kimi_k25' is the vision-language "
                    "model we read (text_config + vision_config)")
        if hf.get("tie_word_embeddings", False):
            _refuse("tie_word_embeddings", True, "separate embedding and head only")
        vision = vision_config_from_hf(hf)
        lm = lm_config_from_hf(hf["text_config"])
        text_hidden = hf["vision_config"].get("text_hidden_size")
        if text_hidden is not None and text_hidden != lm.hidden:
            _refuse("vision_config text_hidden_size", text_hidden,
                    f"the projector ends at the LM width {lm.hidden}")
        media = hf.get("media_placeholder_token_id", hf.get("image_token_id"))
        cfg = ModelConfig(preset="hf", lm=lm, vision=vision)
        if media is not None:
            cfg.media_token_id = int(media)
    else:
        archs = hf.get("architectures") or []
        if archs and not set(archs) & set(LM_ARCHITECTURES):
            _refuse("architectures", archs, f"one of {LM_ARCHITECTURES} or {K25_ARCHITECTURE}")
        cfg = ModelConfig(preset="hf", lm=lm_config_from_hf(hf),
                          vision=preset(vision_preset).vision)
    if media_token_id is not None:
        cfg.media_token_id = media_token_id
    cfg.validate()
    return cfg


def lm_config_to_hf(lm: LMConfig, base: dict | None = None) -> dict:
    """A DeepseekV3 `config.json` for `lm`: `base` (the imported source config) with every
    field we model rewritten, or a fresh one."""
    if lm.latent_norm_eps != HF_LATENT_NORM_EPS:
        _refuse("model.lm.latent_norm_eps", lm.latent_norm_eps,
                f"DeepseekV3 readers build the MLA latent norms with {HF_LATENT_NORM_EPS}")
    out = {k: v for k, v in (base or {}).items()
           if k not in ("quantization_config", "rope_scaling", "rope_parameters")}
    out.setdefault("architectures", list(LM_ARCHITECTURES))
    out.setdefault("model_type", "deepseek_v3")
    rope: dict = {"rope_theta": lm.rope_theta, "rope_type": "default"}
    if lm.yarn_factor > 1:
        rope.update(rope_type="yarn", factor=lm.yarn_factor,
                    original_max_position_embeddings=lm.yarn_original_max_position,
                    beta_fast=lm.yarn_beta_fast, beta_slow=lm.yarn_beta_slow)
        if lm.yarn_mscale_all_dim:
            rope.update(mscale=lm.yarn_mscale, mscale_all_dim=lm.yarn_mscale_all_dim)
        elif lm.yarn_mscale != 1.0:
            _refuse("yarn_mscale without yarn_mscale_all_dim", lm.yarn_mscale,
                    "transformers ignores mscale unless mscale_all_dim is set")
        out.setdefault("max_position_embeddings",
                       int(lm.yarn_original_max_position * lm.yarn_factor))
    out.update(
        vocab_size=lm.vocab_size, hidden_size=lm.hidden, num_hidden_layers=lm.layers,
        num_attention_heads=lm.heads, num_key_value_heads=lm.heads, q_lora_rank=lm.q_lora_rank,
        kv_lora_rank=lm.kv_lora_rank, qk_nope_head_dim=lm.qk_nope_head_dim,
        qk_rope_head_dim=lm.qk_rope_head_dim, v_head_dim=lm.v_head_dim,
        first_k_dense_replace=lm.first_k_dense, intermediate_size=lm.dense_hidden,
        n_routed_experts=lm.num_experts, num_experts_per_tok=lm.top_k,
        n_shared_experts=lm.num_shared_experts, moe_intermediate_size=lm.expert_hidden,
        routed_scaling_factor=lm.routed_scaling_factor, rms_norm_eps=lm.norm_eps,
        initializer_range=lm.init_std, hidden_act="silu", attention_bias=False,
        tie_word_embeddings=False, norm_topk_prob=True, rope_interleave=True,
        n_group=lm.router_groups, topk_group=lm.router_topk_groups, num_nextn_predict_layers=0,
        rope_parameters=rope)
    # transformers 4 and the published configs read these two
    out["rope_theta"] = lm.rope_theta
    out["rope_scaling"] = ({k if k != "rope_type" else "type": v for k, v in rope.items()
                            if k != "rope_theta"} if lm.yarn_factor > 1 else None)
    return out


def k25_config_to_hf(cfg: ModelConfig, base: dict | None = None) -> dict:
    """A Kimi K2.5 `config.json` for `cfg`: `base` (the imported source config: a K2.5 one,
    or a DeepseekV3 one that becomes the text_config) with every field we model rewritten,
    in both the release's and transformers' spellings."""
    v = cfg.vision
    if v.norm_eps != MOONVIT_NORM_EPS:
        _refuse("model.vision.norm_eps", v.norm_eps,
                f"K2.5 readers build MoonViT's LayerNorms with eps {MOONVIT_NORM_EPS}: train with "
                f"--model.vision.norm_eps {MOONVIT_NORM_EPS}, or export the LM alone (--lm-only)")
    if v.pos_emb_height != v.pos_emb_width:
        _refuse("model.vision pos_emb_height/width", (v.pos_emb_height, v.pos_emb_width),
                "transformers' Kimi K2.5 reads a square position table (--lm-only exports the LM)")
    base = dict(base or {})
    if not is_vlm(base):
        base = {"text_config": base}
    out = {k: val for k, val in base.items() if k != "quantization_config"}
    out.setdefault("architectures", [K25_ARCHITECTURE])
    out["model_type"] = "kimi_k25"
    out["text_config"] = lm_config_to_hf(cfg.lm, base.get("text_config"))
    vision = dict(base.get("vision_config") or {})
    for ours, (release_key, transformers_key) in _VISION_KEYS.items():
        vision[release_key] = vision[transformers_key] = getattr(v, ours)
    vision.update(_VISION_FIXED, patch_size=v.patch_size, num_channels=v.in_channels,
                  merge_kernel_size=[2, 2], mm_hidden_size=v.hidden, text_hidden_size=cfg.lm.hidden,
                  projector_ln_eps=PROJECTOR_NORM_EPS, rope_theta=v.rope_theta,
                  rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
    out["vision_config"] = vision
    out.update(projection_hidden_size=v.hidden, projection_layer_norm_eps=PROJECTOR_NORM_EPS,
               media_placeholder_token_id=cfg.media_token_id, image_token_id=cfg.media_token_id,
               tie_word_embeddings=False)
    return out
