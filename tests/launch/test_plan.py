"""Parameter counts: formulas equal the built modules; k25 matches the published sizes."""
import re
import pytest
import torch

from launch.plan import main as plan_main
from model.config import preset
from model.lm import LanguageModelChunk
from model.param_count import count
from model.vision_language import VisionEncoder


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_formulas_equal_instantiated_modules(name):
    cfg = preset(name)
    with torch.device("meta"):
        lm, vision = LanguageModelChunk(cfg.lm), VisionEncoder(cfg)
    c = count(cfg)
    assert c.lm_total == sum(p.numel() for p in lm.parameters())
    assert c.vision_total == sum(p.numel() for p in vision.parameters())
    # active = total minus the unchosen routed experts and the embedding table
    experts_per_layer = sum(p.numel() for p in lm.layers[str(cfg.lm.layers - 1)].ffn.experts.parameters())
    unchosen = cfg.lm.num_moe_layers * experts_per_layer * (cfg.lm.num_experts - cfg.lm.top_k) // cfg.lm.num_experts
    assert c.lm_active == c.lm_total - unchosen - lm.embed.weight.numel()


def test_k25_matches_published_totals(capsys):
    c = count(preset("k25"))
    assert abs(c.lm_total / 1.04e12 - 1) < 0.02  # Kimi K2: 1.04T total
    assert abs(c.lm_active / 32e9 - 1) < 0.02  # 32B activated
    assert 0.4e9 < c.vision_total < 0.5e9  # MoonViT (SigLIP-SO-400M) + projector
    assert plan_main(["--model", "k25"]) == 0
    out = capsys.readouterr().out
    assert "1.026T" in out and "31.687B" in out


def test_tiny_is_about_ten_million():
    assert 5e6 < count(preset("tiny")).total < 15e6


def test_schedule_with_ep_overlap_pairs_and_is_faster_than_plain(capsys):
    from launch.plan import main
    assert main(["--schedule", "--pp", "4", "--vpp", "2", "--microbatches", "8",
                 "--ep-overlap", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "deadlock-free" in out and "F2.4+" in out  # an FB action of rank 2
    plain, overlapped, ratio = re.search(
        r"plain ([\d.]+), overlapped ([\d.]+) \(\d+ FB pairs; ([\d.]+)x\)", out).groups()
    assert float(overlapped) < float(plain)
    # no all-to-all time: pairing changes nothing (an FB is then exactly F + B)
    assert main(["--schedule", "--pp", "4", "--vpp", "2", "--microbatches", "8",
                 "--ep-overlap", "0"]) == 0
    out = capsys.readouterr().out
    plain, overlapped = re.search(r"plain ([\d.]+), overlapped ([\d.]+)", out).groups()
    assert plain == overlapped
    assert main(["--schedule", "--ep-overlap", "2"]) == 2


def test_optimizer_comparison_prints_both_side_by_side(capsys):
    args = ["--model", "tiny", "--pp", "2", "--dp", "2", "--seq-len", "128"]
    assert plan_main(args + ["--optimizer", "compare"]) == 0
    out = capsys.readouterr().out
    assert "optimizer adamw vs muonclip" in out
    assert "adamw (GiB)" in out and "muonclip (GiB)" in out
    ratios = re.search(r"optimizer state, muonclip / adamw\s+([\d.]+)\s+([\d.]+)", out).groups()
    assert all(0 < float(r) < 1 for r in ratios), out  # momentum only for the matrices
    assert plan_main(args + ["--optimizer", "compare", "--json"]) == 2
