"""Kimi K2.5 (KimiK25ForConditionalGeneration) checkpoints in and out: our vision tower +
projector and our whole model equal transformers', round trips are bitwise, the k25 preset
is the published config."""
from __future__ import annotations

import json

import pytest
import torch

from tests.convert.hf_models import (hf_media_embeddings, load_k25, our_model, random_k25,
                                     save_tiny_k25)

from launch.convert import main as convert  # noqa: E402
from model.config import ConfigError, model_config_from_dict, preset  # noqa: E402
from trainer.checkpoint import read_tensors, verify  # noqa: E402

safetensors = pytest.importorskip("safetensors.torch")

# packed items of one encoder call: (t, h, w) patch grids
IMAGES = [(1, 4, 6), (1, 8, 8), (1, 2, 2)]  # resized table, the table's own size, tiny
VIDEO = [(4, 6, 4), (1, 4, 6), (2, 10, 12), (3, 2, 2)]  # chunks of 4/2/3 frames, larger than the table


@pytest.fixture(scope="module")
def k25(tmp_path_factory):
    """(transformers model, its release-layout dir, our import of it, our model config)."""
    root = tmp_path_factory.mktemp("k25")
    hf_dir, model = save_tiny_k25(root / "hf")
    ckpt = root / "ckpt"
    assert convert(["import", "--from", "hf", str(hf_dir), "--to", str(ckpt)]) == 0
    assert verify(ckpt) is None
    cfg = model_config_from_dict(json.loads((ckpt / "meta.json").read_text())["model"])
    return model, hf_dir, ckpt, cfg


def _patches(grids, seed):
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 14 * 14, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grids", [IMAGES, VIDEO], ids=["images", "video+image"])
def test_vision_tower_and_projector_equal_transformers(k25, grids):
    """One packed encoder call (images; video chunks of 2-4 frames beside an image; grids
    smaller than, equal to and larger than the position table). Catches: the 2D RoPE pair
    order (row/column swap not applied), wqkv split or head order, the conv patch weight
    flattened in another order, the LayerNorm eps, a norm/bias mapped to the wrong block
    part, the time embedding, temporal pooling or the 2x2 group order, the projector."""
    model, _, ckpt, cfg = k25
    patches = _patches(grids, seed=len(grids))
    ref = hf_media_embeddings(model, patches, grids)
    with torch.no_grad():
        ours = our_model(cfg, ckpt).vision(patches, grids)
    assert ours.shape == ref.shape == (sum(h * w // 4 for _, h, w in grids), 64)
    assert ref.abs().mean() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_whole_model_logits_equal_transformers(k25):
    """Text with image placeholders (K2.5's media token) -> logits: the LM under
    `language_model.`, K2.5's rms_norm_eps 1e-5 with the latent norms at 1e-6, YaRN, and
    the media embeddings placed where transformers puts them."""
    model, _, ckpt, cfg = k25
    grids = [(1, 4, 6), (2, 4, 4)]
    patches = _patches(grids, seed=7)
    media = cfg.media_token_id
    assert media == model.config.image_token_id == 1
    gen = torch.Generator().manual_seed(3)
    text = torch.randint(6, 96, (1, 40), generator=gen)
    tokens = torch.cat([text[:, :5], torch.full((1, 6), media), text[:, 5:20],
                        torch.full((1, 4), media), text[:, 20:]], dim=1)
    with torch.no_grad():
        ref = model(input_ids=tokens, pixel_values=patches.reshape(-1, 3, 14, 14),
                    image_grid_thw=torch.tensor(grids)).logits
        S = tokens.shape[1]
        ours = our_model(cfg, ckpt)(tokens, torch.arange(S)[None], torch.zeros(1, S, dtype=torch.long),
                                    patches, grids, (tokens[0] == media).nonzero()[:, 0])
    assert cfg.lm.norm_eps == 1e-5 and cfg.lm.latent_norm_eps == 1e-6 and cfg.lm.yarn_factor == 8
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def _hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        out.update(safetensors.load_file(file))
    return out


def test_round_trips_are_bitwise_and_transformers_reads_the_export(k25, tmp_path):
    """HF -> ours -> HF gives back every tensor of the release layout bit for bit (catches an
    export layout change that is not the import's inverse: the pair swap, the conv reshape,
    a renamed or dropped tensor); transformers loads the export with nothing missing or left
    over and computes the same; ours -> HF -> ours is bitwise; --lm-only writes a
    DeepseekV3 checkpoint."""
    model, hf_dir, ckpt, _ = k25
    assert convert(["export", "--from", str(ckpt), "--to", "hf", str(tmp_path / "hf2"),
                    "--shard-gib", str(40e3 / 2**30)]) == 0
    assert len(list((tmp_path / "hf2").glob("*.safetensors"))) > 1
    a, b = _hf_tensors(hf_dir), _hf_tensors(tmp_path / "hf2")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert config["vision_config"]["vt_hidden_size"] == config["vision_config"]["hidden_size"] == 32

    reloaded = load_k25(tmp_path / "hf2")
    patches = _patches(VIDEO, seed=11)
    torch.testing.assert_close(hf_media_embeddings(reloaded, patches, VIDEO),
                               hf_media_embeddings(model, patches, VIDEO), rtol=0, atol=0)

    assert convert(["import", "--from", "hf", str(tmp_path / "hf2"), "--to",
                    str(tmp_path / "ckpt2")]) == 0
    x, y = read_tensors(ckpt), read_tensors(tmp_path / "ckpt2")
    assert x.keys() == y.keys() and any(k.startswith("model.vision.") for k in x)
    assert all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)

    assert convert(["export", "--from", str(ckpt), "--to", "hf", str(tmp_path / "lm"),
                    "--lm-only"]) == 0
    lm = _hf_tensors(tmp_path / "lm")
    assert lm.keys() == {k.removeprefix("language_model.") for k in a
                         if k.startswith("language_model.")}
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["architectures"] == [
        "DeepseekV3ForCausalLM"]


# moonshotai/Kimi-K2.5 config.json, the fields that shape the network, as published (the
# release's vision_config spelling; text_config as transformers 5.7 reads it). Transcribed
# from a dump of that file, not downloaded here.
PUBLISHED_K25 = {
    "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
    "media_placeholder_token_id": 163605, "tie_word_embeddings": False,
    "text_config": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "attention_bias": False, "first_k_dense_replace": 1, "hidden_act": "silu",
        "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 262144, "moe_intermediate_size": 2048,
        "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 384, "n_shared_experts": 1,
        "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "num_key_value_heads": 64, "num_nextn_predict_layers": 0,
        "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05,
        "rope_parameters": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0,
                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                            "rope_theta": 50000.0, "rope_type": "yarn", "type": "yarn"},
        "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid",
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc",
        "v_head_dim": 128, "vocab_size": 163840},
    "vision_config": {
        "init_pos_emb_height": 64, "init_pos_emb_time": 4, "init_pos_emb_width": 64,
        "merge_kernel_size": [2, 2], "merge_type": "sd2_tpool", "mm_hidden_size": 1152,
        "mm_projector_type": "patchmerger", "model_type": "", "patch_size": 14,
        "pos_emb_type": "divided_fixed", "projector_hidden_act": "gelu",
        "projector_ln_eps": 1e-05, "text_hidden_size": 7168,
        "video_attn_type": "spatial_temporal", "vt_hidden_size": 1152,
        "vt_intermediate_size": 4304, "vt_num_attention_heads": 16, "vt_num_hidden_layers": 27},
}


def test_k25_preset_is_the_published_config():
    """Every field of the k25 preset equals the published K2.5 config.json's: YaRN factor 64
    with beta_fast 32 (K2 had 32 and 1), rms_norm_eps 1e-5 (K2: 1e-6), MoonViT eps 1e-5.
    Catches a preset that drifts from the release, or a config reader that drops a field."""
    from model.hf_config import model_config_from_hf
    ours, published = preset("k25"), model_config_from_hf(PUBLISHED_K25)
    assert published.lm == ours.lm
    assert published.vision == ours.vision
    assert published.media_token_id == ours.media_token_id


@pytest.mark.parametrize("section,change,message", [
    (None, {"model_type": "qwen2_5_vl"}, "model_type"),
    (None, {"tie_word_embeddings": True}, "tie_word_embeddings"),
    ("vision_config", {"pos_emb_type": "learnable"}, "pos_emb_type"),
    ("vision_config", {"merge_kernel_size": [3, 3]}, "merge_kernel_size"),
    ("vision_config", {"init_pos_emb_width": 32}, "square"),
    ("vision_config", {"projector_ln_eps": 1e-6}, "projector_ln_eps"),
    ("vision_config", {"hidden_act": "gelu"}, "hidden_act"),
    ("vision_config", {"mm_hidden_size": 7168}, "mm_hidden_size"),
])
def test_unsupported_k25_configs_are_refused(section, change, message):
    from model.hf_config import model_config_from_hf
    config = json.loads(json.dumps(PUBLISHED_K25))
    (config[section] if section else config).update(change)
    with pytest.raises(ConfigError, match=message):
        model_config_from_hf(config)


def test_export_refuses_what_k25_readers_would_compute_otherwise(k25, tmp_path):
    """A vision encoder trained with LayerNorm eps 1e-6 (our tiny/small default) cannot be
    written as K2.5 (its readers hard-code 1e-5): refused before anything is written;
    --lm-only still exports the LM."""
    _, _, ckpt, _ = k25
    meta_path = ckpt / "meta.json"
    copy = tmp_path / "ckpt"
    import shutil
    shutil.copytree(ckpt, copy)
    meta = json.loads(meta_path.read_text())
    meta["model"]["vision"]["norm_eps"] = 1e-6
    (copy / "meta.json").write_text(json.dumps(meta))
    from trainer.checkpoint import MANIFEST, _manifest
    (copy / MANIFEST).write_text(json.dumps(_manifest(copy)))
    assert convert(["export", "--from", str(copy), "--to", "hf", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert convert(["export", "--from", str(copy), "--to", "hf", str(tmp_path / "lm"),
                    "--lm-only"]) == 0


def test_a_run_starts_from_a_k25_import_and_exports_back(k25, tmp_path):
    """The whole path: K2.5 import -> `--init_from` run (one step at lr 1e-12, so the weights
    stay put) -> its checkpoint exported as K2.5 -> transformers loads it, and every tensor
    equals the published one except the routers' balancing biases (moved by their update).
    Catches: the encoder not loaded by --init_from (left at its seed), a run checkpoint's
    names or layout that export does not map."""
    from launch.train import main as train_main
    _, hf_dir, ckpt, _ = k25
    run = tmp_path / "run"
    assert train_main(["--config", "configs/tiny.toml", "--data.uri", "synthetic",
                       "--train.global_batch", "2", "--data.seq_len", "48", "--init_from",
                       str(ckpt), "--train.steps", "1", "--checkpoint.interval", "1",
                       "--optim.lr", "1e-12", "--optim.min_lr", "0", "--job.run_dir", str(run)]) == 0
    step, = (run / "checkpoints").glob("step_*")
    assert convert(["export", "--from", str(step), "--to", "hf", str(tmp_path / "hf")]) == 0
    load_k25(tmp_path / "hf")
    published, exported = _hf_tensors(hf_dir), _hf_tensors(tmp_path / "hf")
    assert published.keys() == exported.keys()
    for name, t in published.items():
        if "e_score_correction_bias" not in name:
            torch.testing.assert_close(exported[name], t, rtol=0, atol=1e-9, msg=name)
