"""Parallel layouts: sizes refused at start-up with what to change, explicit pipeline
layouts parsed and checked against the model and the schedule, and the automatic layout
exactly optimal for its cost model (brute force) and right for K2.5 (by hand)."""
import itertools
import random

import pytest

from model.config import ConfigError, preset
from model.lm import ChunkSpec
from parallel.layout import (ItemCost, LayoutError, PipelineLayout, auto_layout, expand_notation,
                             item_costs, parse_layout, resolve_layout)
from parallel.topology import ParallelSizes, check_layout
from trainer.config import load_config


def escaped(message: str) -> str:
    return "".join("\\" + c if c in "()[]|*." else c for c in message)


@pytest.mark.parametrize("sizes, kwargs, message", [
    (ParallelSizes(pp=2, dp=2), dict(world_size=3), "launch 4 ranks or change pp/dp"),
    (ParallelSizes(ep=3, dp=3), dict(world_size=3), "num_experts=16 do not split over parallel.ep=3"),
    (ParallelSizes(ep=4, dp=2), dict(), "parallel.ep=4 must divide parallel.dp=2"),
    (ParallelSizes(pp=2, vpp=2), dict(microbatches=3), "positive multiple of parallel.pp=2"),
    (ParallelSizes(pp=2, vpp=2), dict(microbatches=1), "positive multiple of parallel.pp=2"),
    (ParallelSizes(vpp=2), dict(), "vpp > 1 needs parallel.pp > 1"),
    (ParallelSizes(dp=0), dict(), "parallel.dp must be >= 1"),
])
def test_check_layout_refuses(sizes, kwargs, message):
    args = dict(num_experts=16, microbatches=4) | kwargs
    with pytest.raises(LayoutError, match=escaped(message)):
        check_layout(sizes, **args)


def test_valid_sizes_pass():
    for sizes, m in [(ParallelSizes(pp=2, vpp=2, ep=2, dp=2), 2), (ParallelSizes(pp=4), 1),
                     (ParallelSizes(pp=3), 1), (ParallelSizes(ep=16, dp=16), 1),
                     (ParallelSizes(), 1)]:
        check_layout(sizes, num_experts=16, microbatches=m, world_size=sizes.world)


def test_job_config_refuses_through_the_same_checks():
    cfg = load_config(["--parallel.pp", "2", "--parallel.vpp", "2", "--parallel.dp", "2",
                       "--train.global_batch", "6", "--train.micro_batch", "1"])
    with pytest.raises(ConfigError, match="microbatches per replica \\(3"):
        cfg.validate(world_size=4)
    cfg = load_config(["--parallel.pp", "2", "--parallel.dp", "2"])
    with pytest.raises(ConfigError, match="the job has 8 ranks"):
        cfg.validate(world_size=8)
    cfg = load_config(["--parallel.pp", "2", "--parallel.layout", "Ett|tt|L"])
    with pytest.raises(ConfigError, match="3 chunks but parallel.pp x parallel.vpp = 2"):
        cfg.validate(world_size=2)


# ---------------------------------------------------------------- the notation


def test_notation_expands():
    assert expand_notation("Et*3|(tt|)*2L") == "Ettt|tt|tt|L"
    assert expand_notation(" E t | ( t | ) * 2 L ") == "Et|t|t|L"
    assert expand_notation("((t|)*2t)*2") == "t|t|tt|t|t"


@pytest.mark.parametrize("text, message", [
    ("Ex|L", "unknown symbol 'x'"), ("E(t|L", "unclosed '('"), ("Et)|L", "unmatched ')'"),
    ("Et*|L", "'*' needs a repeat count"),
])
def test_bad_notation_is_refused(text, message):
    with pytest.raises(LayoutError, match=escaped(message)):
        expand_notation(text)


@pytest.mark.parametrize("text, stages, message", [
    ("Ett|ttL", 3, "2 chunks but parallel.pp x parallel.vpp = 3"),
    ("Ett|tL", 2, "places 3 decoder layers (t) but the model has model.lm.layers=4"),
    ("tEt|ttL", 2, "the embedding E must appear once, first in chunk 0"),
    ("Et|EtttL", 2, "the embedding E must appear once"),
    ("Ett|tLt", 2, "the head L must appear once, last in the last chunk"),
    ("Ett||ttL", 3, "chunk 1 is empty"),
])
def test_explicit_layout_is_checked_against_model_and_schedule(text, stages, message):
    with pytest.raises(LayoutError, match=escaped(message)):
        parse_layout(text, preset("tiny").lm, stages)


def test_explicit_layout_chunks():
    layout = parse_layout("E|t|(tt|)*1t|L", preset("tiny").lm, 5)
    assert layout.chunks == (ChunkSpec(True, range(0, 0), False), ChunkSpec(False, range(0, 1), False),
                             ChunkSpec(False, range(1, 3), False), ChunkSpec(False, range(3, 4), False),
                             ChunkSpec(False, range(4, 4), True))
    assert layout.notation() == "E|t|tt|t|L"


@pytest.mark.parametrize("name, pp, vpp", [("tiny", 2, 1), ("tiny", 2, 2), ("tiny", 3, 1),
                                          ("k25", 16, 2), ("k25", 8, 1), ("k25", 4, 4)])
def test_notation_round_trips(name, pp, vpp):
    cfg = preset(name).lm
    layout = resolve_layout("auto", cfg, pp=pp, vpp=vpp, seq_len=4096, micro_batch=1, ep=1)
    assert parse_layout(layout.notation(), cfg, pp * vpp) == layout


# ---------------------------------------------------------------- the automatic layout


@pytest.mark.parametrize("pp, vpp, expected", [(2, 1, "Ett|ttL"), (2, 2, "Et|t|t|tL"),
                                               (4, 1, "Et|t|t|tL")])
def test_auto_layout_of_tiny_is_the_old_even_split(pp, vpp, expected):
    """Before layouts existed, chunks held layers/(pp*vpp) each; the golden and equivalence
    numbers of tiny were made that way and must not move."""
    layout = resolve_layout("auto", preset("tiny").lm, pp=pp, vpp=vpp, seq_len=128,
                            micro_batch=1, ep=1)
    assert expand_notation(layout.notation()) == expected


def test_auto_layout_of_k25_at_pp16_vpp2_against_hand_computed_costs():
    """Per-token forward FLOPs of K2.5's pieces at S=4096, by hand (multiply-add = 2 FLOPs):

    MLA projections: D*q_lora + q_lora*H*(nope+rope) + D*(kv_lora+rope) + kv_lora*H*(nope+v)
                     + H*v*D = 7168*1536 + 1536*64*192 + 7168*576 + 512*64*256 + 64*128*7168
                     = 101,122,048 MACs -> 202,244,096
    attention:       H*(192+128) = 20,480 MACs per key, mean keys (4096+1)/2 -> 83,906,560
    dense FFN:       3*7168*18432 MACs -> 792,723,456
    router:          7168*384 -> 5,505,024;  8 experts: 8*3*7168*2048 -> 704,643,072
    shared expert:   3*7168*2048 -> 88,080,384
    dense layer  = 202,244,096 + 83,906,560 + 792,723,456                          = 1,078,874,112
    MoE layer    = 202,244,096 + 83,906,560 + 5,505,024 + 704,643,072 + 88,080,384 = 1,084,379,136
    head         = 2*7168*163840                                                     = 2,348,810,240

    The head alone (2.35 GFLOP) exceeds two MoE layers (2.17) but not three (3.25), so the
    slowest chunk is the head's and every other chunk holds at most two layers: 31 chunks
    for 61 layers leave one with a single layer. Parameters per rank at ep=16 break the tie:
    E holds 1,174,405,120, the dense layer 497,500,160, a MoE layer 1,204,895,744 (24 of
    384 experts), so E + dense (1.67B) beats E + dense + MoE (2.88B) against 2 x MoE (2.41B).
    """
    cfg = preset("k25").lm
    costs = item_costs(cfg, seq_len=4096, micro_batch=1, ep=16)
    per_token = [c.flops / 4096 for c in costs]
    assert per_token[0] == 0
    assert per_token[1] == 1_078_874_112
    assert set(per_token[2:-1]) == {1_084_379_136}
    assert per_token[-1] == 2_348_810_240
    assert [c.params for c in costs[:3]] == [1_174_405_120, 497_500_160, 1_204_895_744]
    layout = resolve_layout("auto", cfg, pp=16, vpp=2, seq_len=4096, micro_batch=1, ep=16)
    assert layout.notation() == "Et|(tt|)*30L"
    assert len(layout.chunks) == 32 and layout.chunks[-1] == ChunkSpec(False, range(61, 61), True)


def lexicographic_objective(costs: list[ItemCost], bounds: list[int]) -> tuple:
    chunks = [costs[a:b] for a, b in zip(bounds, bounds[1:])]
    flops = [sum(c.flops for c in chunk) for chunk in chunks]
    params = [sum(c.params for c in chunk) for chunk in chunks]
    return max(flops), max(params), sum(f * f for f in flops)


@pytest.mark.parametrize("seed", range(12))
def test_auto_layout_is_optimal_by_brute_force(seed):
    rng = random.Random(seed)
    layers, stages = rng.randint(2, 7), rng.randint(2, 5)
    costs = ([ItemCost("E", 0.0, rng.randint(1, 9))]
             + [ItemCost("t", float(rng.randint(1, 9)), rng.randint(1, 9)) for _ in range(layers)]
             + [ItemCost("L", float(rng.randint(1, 9)), rng.randint(1, 9))])
    if len(costs) < stages:
        with pytest.raises(LayoutError, match="lower pp or vpp"):
            auto_layout(costs, stages)
        return
    layout = auto_layout(costs, stages)
    sizes = [int(c.embed) + len(c.layers) + int(c.head) for c in layout.chunks]
    got = lexicographic_objective(costs, [0, *itertools.accumulate(sizes)])
    best = min(lexicographic_objective(costs, [0, *cuts, len(costs)])
               for cuts in itertools.combinations(range(1, len(costs)), stages - 1))
    assert got == best


def test_layouts_are_plain_data():
    layout = PipelineLayout((ChunkSpec(True, range(0, 2), False), ChunkSpec(False, range(2, 4), True)))
    assert layout.symbols() == ["Ett", "ttL"]
    assert layout.notation() == "Ett|ttL"
