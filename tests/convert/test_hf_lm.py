"""Kimi K2 / DeepSeek-V3 (DeepseekV3ForCausalLM) checkpoints in and out: our logits equal
transformers', a round trip is bitwise, FP8 blocks dequantise within their error."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.convert.hf_models import (fp8_quantize, hf_logits, our_lm, our_logits,
                                     save_tiny_deepseek)

from launch.convert import main as convert  # noqa: E402
from model.config import ConfigError  # noqa: E402
from trainer.checkpoint import read_tensors, verify  # noqa: E402
from trainer.hf_checkpoint import import_hf  # noqa: E402

safetensors = pytest.importorskip("safetensors.torch")


def _import(hf_dir, ckpt, *extra):
    assert convert(["import", "--from", "hf", str(hf_dir), "--to", str(ckpt),
                    "--vision-preset", "tiny", *extra]) == 0
    assert verify(ckpt) is None
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["weights_only"] and meta["step"] == 0
    from model.config import model_config_from_dict
    return model_config_from_dict(meta["model"])


def _hf_tensors(hf_dir) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        out.update(safetensors.load_file(file))
    return out


GROUP_LIMITED = {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3}


@pytest.mark.parametrize("yarn,changes", [(True, {}), (False, {}), (False, GROUP_LIMITED)],
                         ids=["yarn", "plain-rope", "group-limited"])
def test_logits_equal_transformers(tmp_path, yarn, changes):
    """Catches: a missing or wrong rope-row permutation, a mis-mapped name, wrong YaRN fields
    (factor, mscale, original length), a router bias not imported, a wrong softmax scale;
    group-limited routing (DeepSeek-V3's n_group / topk_group: 8 experts in 4 groups, top-3
    from the best 2 groups) ignored, or groups scored otherwise than by their two best."""
    hf_dir = save_tiny_deepseek(tmp_path / "hf", yarn=yarn, **changes)
    cfg = _import(hf_dir, tmp_path / "ckpt")
    assert (cfg.lm.yarn_factor == 8.0) == yarn
    assert (cfg.lm.router_groups, cfg.lm.router_topk_groups) == (
        changes.get("n_group", 1), changes.get("topk_group", 1))
    tokens = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(hf_dir, tokens)
    ours = our_logits(our_lm(cfg, tmp_path / "ckpt"), tokens)
    assert ref.shape == ours.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_packed_documents_equal_separate_transformers_runs(tmp_path):
    """Two documents packed in one row (positions restart, attention stays inside each) give
    transformers' logits of each document run alone."""
    hf_dir = save_tiny_deepseek(tmp_path / "hf")
    cfg = _import(hf_dir, tmp_path / "ckpt")
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 96, (1, 23), generator=gen), torch.randint(0, 96, (1, 17), generator=gen)
    doc_ids = torch.cat([torch.zeros(1, 23), torch.ones(1, 17)], dim=1).long()
    ours = our_logits(our_lm(cfg, tmp_path / "ckpt"), torch.cat([a, b], dim=1), doc_ids)
    torch.testing.assert_close(ours[:, :23], hf_logits(hf_dir, a), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[:, 23:], hf_logits(hf_dir, b), rtol=0, atol=1e-5)


def test_round_trips_are_bitwise(tmp_path):
    """HF -> ours -> HF gives back every tensor bit for bit (names, dtypes, values: catches an
    export permutation that is not the import's inverse, a dropped or renamed tensor); and
    ours -> HF -> ours gives back our checkpoint bit for bit."""
    hf_dir = save_tiny_deepseek(tmp_path / "hf")
    _import(hf_dir, tmp_path / "ckpt")
    assert convert(["export", "--from", str(tmp_path / "ckpt"), "--to", "hf",
                    str(tmp_path / "hf2"), "--shard-gib", str(20e3 / 2**30)]) == 0
    assert len(list((tmp_path / "hf2").glob("*.safetensors"))) > 1  # several shards
    a, b = _hf_tensors(hf_dir), _hf_tensors(tmp_path / "hf2")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    source = json.loads((hf_dir / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "n_routed_experts", "qk_rope_head_dim",
                "rope_interleave", "routed_scaling_factor", "max_position_embeddings"):
        assert config[key] == source[key], key
    assert {k: v for k, v in config["rope_parameters"].items()} == source["rope_parameters"]

    _import(tmp_path / "hf2", tmp_path / "ckpt2")
    x, y = read_tensors(tmp_path / "ckpt"), read_tensors(tmp_path / "ckpt2")
    assert x.keys() == y.keys()
    assert all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def test_fp8_block_quantised_import(tmp_path):
    """Every linear weight of layers 1.. stored as float8_e4m3fn with 128 x 128 block scales
    (a 160-wide model: full and partial blocks) imports to the dequantised weights: equal to
    q * scale exactly, and within the e4m3 rounding (2^-4 of the block's max) of the original
    weights. Catches a transposed or mis-broadcast scale, a scale used as a divisor, a block
    size read wrongly, FP8 weights copied without their scale."""
    hf_dir = save_tiny_deepseek(tmp_path / "hf", hidden_size=160, intermediate_size=200,
                                q_lora_rank=136)
    original = _hf_tensors(hf_dir)
    quantised, block = {}, 128
    for name, w in original.items():
        if w.ndim == 2 and ".layers." in name and "mlp.gate.weight" not in name:
            q, scale = fp8_quantize(w, block)
            quantised[name], quantised[name + "_scale_inv"] = q, scale
        else:
            quantised[name] = w
    fp8_dir = tmp_path / "fp8"
    fp8_dir.mkdir()
    safetensors.save_file(quantised, fp8_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (fp8_dir / "config.json").write_text(json.dumps(config))

    _import(fp8_dir, tmp_path / "ckpt_fp8", "--dtype", "fp32")
    _import(hf_dir, tmp_path / "ckpt")
    deq, exact = read_tensors(tmp_path / "ckpt_fp8"), read_tensors(tmp_path / "ckpt")
    checked = 0
    for hf_name, q in quantised.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        # the same tensor in our checkpoint: find it by matching the exact import
        scale = quantised[hf_name + "_scale_inv"]
        expected = q.float() * torch.kron(scale, torch.ones(block, block))[:q.shape[0], :q.shape[1]]
        matches = [k for k, v in exact.items() if v.shape == q.shape
                   and torch.equal(_layout_free(v), _layout_free(original[hf_name]))]
        assert len(matches) == 1, hf_name
        ours = deq[matches[0]]
        assert torch.equal(_layout_free(ours), _layout_free(expected)), hf_name
        err = (ours - exact[matches[0]]).abs()
        bound = torch.kron(scale * 448 * 2 ** -4, torch.ones(block, block))[:q.shape[0], :q.shape[1]]
        assert bool((err <= bound).all()), hf_name
        checked += 1
    assert checked == 3 * 5 + 3 + 2 * (8 * 3 + 3)  # attention, dense FFN, experts + shared


def _layout_free(t: torch.Tensor) -> torch.Tensor:
    """Rows sorted: the rope-row permutation reorders rows, the values stay."""
    return t.sort(dim=0).values


def test_bf16_import_keeps_dtype_and_fp32_option(tmp_path):
    hf_dir = save_tiny_deepseek(tmp_path / "hf")
    tensors = _hf_tensors(hf_dir)
    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    safetensors.save_file({k: v.bfloat16() if "e_score" not in k else v for k, v in tensors.items()},
                          bf16_dir / "model.safetensors")
    (bf16_dir / "config.json").write_text((hf_dir / "config.json").read_text())
    _import(bf16_dir, tmp_path / "a")
    _import(bf16_dir, tmp_path / "b", "--dtype", "fp32")
    a, b = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    assert a["model.lm.embed.weight"].dtype == torch.bfloat16
    assert b["model.lm.embed.weight"].dtype == torch.float32
    assert a["model.lm.layers.1.ffn.router.bias"].dtype == torch.float32
    assert all(torch.equal(a[k].float(), b[k]) for k in a)


@pytest.mark.parametrize("change,message", [
    ({"q_lora_rank": None}, "q_lora_rank"),
    ({"n_group": 3, "topk_group": 1}, "equal groups"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope type"),
    ({"quantization_config": {"quant_method": "compressed-tensors"}}, "compressed-tensors"),
])
def test_unsupported_configs_are_refused(tmp_path, change, message):
    hf_dir = save_tiny_deepseek(tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(change)
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        import_hf(hf_dir, tmp_path / "ckpt", vision_preset="tiny", log=lambda s: None)
    assert not (tmp_path / "ckpt").exists()


def test_published_style_config_reads_rope_scaling(tmp_path):
    """The published K2 config.json (transformers 4 keys: rope_scaling with `type`, rope_theta
    outside it, quantization_config) maps to the same LM config as the transformers 5 keys."""
    from model.hf_config import lm_config_from_hf
    k2 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
          "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
          "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 64,
          "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 384,
          "routed_scaling_factor": 2.827, "kv_lora_rank": 512, "q_lora_rank": 1536,
          "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 1,
          "topk_group": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
          "norm_topk_prob": True, "hidden_act": "silu", "rms_norm_eps": 1e-6,
          "rope_theta": 50000.0, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
          "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
                           "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                           "type": "yarn"},
          "tie_word_embeddings": False,
          "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                  "quant_method": "fp8", "weight_block_size": [128, 128]}}
    import dataclasses

    from model.config import preset
    # Kimi K2 is K2.5's LM before K2.5's long-context stage and its norm eps change
    assert lm_config_from_hf(k2) == dataclasses.replace(
        preset("k25").lm, yarn_factor=32.0, yarn_beta_fast=1.0, norm_eps=1e-6)
    assert math.isclose(lm_config_from_hf(k2).yarn_factor, 32.0)
