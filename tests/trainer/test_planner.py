"""The planner (trainer/planner.py) in one process: exact bytes of the single-process
engine, its pieces, the trainer's memory refusal and the `launch.plan` command line.

The single-process engine (world of one) holds the whole model with the encoder
inside and torch.optim.AdamW unsharded; its parameter and gradient bytes and AdamW
moments must equal the plan exactly (AdamW's per-parameter step counters, 4 bytes
each, are torch's bookkeeping and not counted), its activations per microbatch within
5% (text-only data here: the encoder's share is checked item by item in
tests/model/test_activation_bytes.py and under DEP in test_planner_memory.py).
"""
import json
import re

import pytest
import torch

from launch.plan import main as plan_main
from model.config import ConfigError
from parallel.activation_memory import SavedTensorBytes
from parallel.schedule import peak_in_flight, schedule, warmup_forwards
from parallel.schedule_sim import simulate
from tests.trainer import memory_probe
from trainer import planner
from trainer.config import load_config
from trainer.hardware import GPUS
from trainer.train import SingleProcessEngine, train

torch.set_num_threads(1)

TEXT = ["--data.uri", "synthetic", "--data.media_per_seq", "0", "--train.steps", "1",
        "--train.global_batch", "4", "--data.seq_len", "96", "--optim.warmup_steps", "1"]
WIDE = ["--model.lm.hidden", "384", "--model.lm.heads", "6", "--model.lm.q_lora_rank", "128",
        "--model.lm.kv_lora_rank", "96", "--model.lm.num_experts", "8", "--model.lm.top_k", "2",
        "--model.lm.expert_hidden", "192", "--model.lm.dense_hidden", "1024"]
K25_32_NODES = ["--model.preset", "k25", "--parallel.pp", "16", "--parallel.vpp", "2",
                "--parallel.ep", "16", "--parallel.dp", "16", "--data.seq_len", "4096",
                "--train.global_batch", "4096", "--data.uri", "synthetic"]


@pytest.mark.parametrize("extra", [[], WIDE, ["--train.micro_batch", "2"]],
                         ids=["tiny", "wide", "micro_batch_2"])
def test_single_process_engine_holds_what_the_plan_says(tmp_path, monkeypatch, extra):
    cfg = load_config(TEXT + extra + ["--job.run_dir", str(tmp_path)])
    cfg.validate(world_size=1)
    engine = SingleProcessEngine(cfg.model, cfg.optim, cfg.train.micro_batch, cfg.train.seed)
    held, grads = [], []
    forward = engine.model.forward

    def measured_forward(*args, **kwargs):
        with SavedTensorBytes() as saved:
            out = forward(*args, **kwargs)
        held.append(saved.bytes)
        return out

    # the loss is computed inside the model's forward (fused head + cross-entropy)
    step = engine.optimizer.step

    def measured_step(*args, **kwargs):
        grads.append(memory_probe.tensor_bytes(p.grad for p in engine.params))
        return step(*args, **kwargs)

    engine.model.forward = measured_forward
    engine.optimizer.step = measured_step
    train(cfg, engine=engine)
    moments = memory_probe.tensor_bytes(
        t for s in engine.optimizer.state.values() for t in (s["exp_avg"], s["exp_avg_sq"]))

    (plan,) = planner.plan_memory(cfg, media=planner.job_media(cfg))
    assert plan.total("weights") == memory_probe.tensor_bytes(engine.params)
    assert plan.total("grads") == grads[0]
    assert plan.total("state") == moments
    assert plan.total("master") == 0 and plan.in_flight == {0: 1}
    assert len(held) == cfg.microbatches_per_replica
    assert abs(plan.activations - max(held)) <= 0.05 * max(held), (plan.activations, held)


def test_peak_in_flight_counts_the_warmup_and_weighs_chunks():
    pp, vpp, m = 4, 2, 8
    actions = schedule(pp, vpp, m)
    for rank in range(pp):
        peak, in_flight = peak_in_flight(actions[rank], lambda s, mb: 1.0)
        assert peak == warmup_forwards(pp, vpp, m, rank) + 1 == sum(in_flight.values())
    # rank 0's first chunk is ten times heavier: the peak comes when most of it is in flight
    peak, in_flight = peak_in_flight(actions[0], lambda s, mb: 10.0 if s == 0 else 1.0)
    assert peak == 10 * in_flight[0] + in_flight.get(4, 0) and in_flight[0] >= 4


def test_simulator_takes_per_chunk_and_microbatch_costs():
    actions = schedule(2, 2, 4)
    flat = simulate(actions, 2, 2, 1.0, 2.0)
    same = simulate(actions, 2, 2, lambda s, mb: 1.0, lambda s, mb: 2.0)
    assert same.makespan == flat.makespan and same.ideal == flat.ideal
    slow_first = simulate(actions, 2, 2, lambda s, mb: 3.0 if s == 0 else 1.0,
                          lambda s, mb: 6.0 if s == 0 else 2.0)
    assert slow_first.makespan > flat.makespan
    assert slow_first.ideal == max(slow_first.busy_time_per_rank)


def test_recipes_and_media_mix():
    adamw, bf16, muon = planner.Recipe(), planner.Recipe("bf16"), planner.Recipe("bf16", "muonclip")
    cfg = load_config(["--data.uri", "synthetic", "--parallel.dp", "2"])
    groups = [planner.plan_memory(cfg, recipe=r)[0].groups for r in (adamw, bf16, muon)]
    dense = [g["dense"] for g in groups]
    assert dense[1].weights * 2 == dense[0].weights and dense[1].grads == dense[0].grads
    assert dense[0].master == 0 and dense[1].master == dense[0].state // 2
    assert dense[1].state > dense[2].state > dense[2].master  # Muon: one slot on matrices
    mix = planner.MediaMix.parse("2*1x32x32, 0.5*4x16x16")
    assert mix.tokens_per_sequence == 2 * 256 + 0.5 * 64
    assert mix.patches_per_sequence == 2 * 1024 + 0.5 * 1024
    counts = [len(mix.sample(8, seed)) for seed in range(200)]
    assert abs(sum(counts) / len(counts) - 20) < 1.0  # Poisson around 8 x 2.5 items
    assert mix.sample(8, 3) == mix.sample(8, 3)
    with pytest.raises(ConfigError, match="COUNT\\*TxHxW"):
        planner.MediaMix.parse("2x32x32")
    with pytest.raises(ConfigError, match="even number of patch rows"):
        planner.MediaMix.parse("1*1x31x32").check(cfg.model, 4096)


def test_trainer_refuses_a_job_that_does_not_fit_with_the_plan(monkeypatch):
    cfg = load_config(K25_32_NODES)
    with pytest.raises(ConfigError, match=r"does not fit: pipeline rank \d+ needs about [\d.]+ "
                                          r"GiB .* a rank may use [\d.]+ GiB \(MemAvailable"):
        cfg.validate()
    monkeypatch.setattr(planner, "host_memory_available", lambda: 1 << 60)
    cfg.validate()  # the k25 layout itself is accepted at pp=16 vpp=2
    tiny = load_config(["--data.uri", "synthetic"])
    tiny.validate()
    monkeypatch.setattr(planner, "host_memory_available", lambda: 1 << 20)
    with pytest.raises(ConfigError, match="does not fit"):
        tiny.validate()


def test_plan_command_prints_first_middle_last_and_fullest_rank(capsys):
    args = ["--model", "small", "--pp", "4", "--vpp", "2", "--ep", "2", "--dp", "2",
            "--seq-len", "1024", "--media", "1*1x16x16", "--precision", "bf16"]
    assert plan_main(args + ["--all", "--json"]) == 0
    ranks = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["pp_rank"] for r in ranks] == [0, 1, 2, 3]
    assert all(r["bytes"]["peak"] > r["bytes"]["weights"] > 0 and r["fits"] for r in ranks)
    fullest = max(ranks, key=lambda r: r["bytes"]["peak"])["pp_rank"]
    assert plan_main(args) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "pipeline rank" in line)
    assert [int(r) for r in re.findall(r"pipeline rank (\d+)", header)] == \
        sorted({0, 2, 3, fullest})
    for text in ("verdict", "fits", "activations at the schedule's peak", "expert all-to-all",
                 "MFU", "text-only", "colocated", "DEP encoder recompute"):
        assert text in out, text
    assert plan_main(["--model", "tiny", "--pp", "3", "--vpp", "3"]) == 2  # 6 pieces, 9 chunks
    assert "lower pp or vpp" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_command_takes_the_k25_layout_at_16_stages(capsys):
    args = ["--model", "k25", "--pp", "16", "--vpp", "2", "--ep", "16", "--dp", "16",
            "--seq-len", "4096", "--micro-batch", "1", "--global-batch", "4096"]
    assert plan_main(args + ["--gpu", "h800", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "layout Et|(tt|)*30L" in out and "pipeline rank 8" in out and "DOES NOT FIT" in out


def test_dep_recompute_counts_what_the_pipeline_holds_in_the_cool_down():
    cfg = load_config(["--data.uri", "synthetic", "--parallel.pp", "2", "--parallel.dp", "2",
                       "--parallel.encoder", "dep", "--train.global_batch", "8"])
    mix = planner.MediaMix.parse("2*1x8x8")
    ranks = planner.plan_memory(cfg, media=mix)
    for rank in ranks:  # R runs after the rank's last forward: less than the peak is held
        pipeline = rank.activations + rank.pipeline_buffers
        assert rank.dep_recompute_beside < pipeline and rank.dep_recompute > 0
        assert rank.peak == rank.static + rank.dep_embeddings + max(
            pipeline, rank.dep_recompute_beside + rank.dep_recompute)
    # rank 0 runs R before its last backward (that chunk-microbatch still held), the last
    # rank after all of its own
    first, last = ranks
    assert first.dep_recompute_beside > 0 and last.dep_recompute_beside == 0
    colocated = planner.plan_memory(load_config(
        ["--data.uri", "synthetic", "--parallel.pp", "2", "--parallel.encoder", "colocated"]),
        media=mix)
    assert all(r.dep_recompute == r.dep_recompute_beside == 0 for r in colocated)


def test_pixels_sit_on_the_ranks_that_encode_them():
    """uint8 pixels of the items a rank decodes in host memory (the step's and those the
    loader decodes ahead), their fp32 normalised copy on the device; DEP: an equal share on
    every rank, colocated: stage 0 its replica's, later stages none; no pixels sent (the
    running job's figures: tests/distributed/test_planner_memory.py)."""
    media = [[(1, 8, 8)], [(1, 8, 8), (4, 4, 4)], [], [(1, 2, 2)]]
    rows, largest_mb, P = 196, 128, load_config([]).model.vision.patch_dim
    args = ["--data.uri", "synthetic", "--parallel.pp", "2", "--parallel.dp", "2",
            "--train.global_batch", "8"]
    workers = ["--data.workers", "2", "--data.prefetch", "3"]  # 3 more steps decode meanwhile
    expected = {("dep", 0): [(rows / 2, rows / 2)] * 2, ("dep", 4): [(4 * rows / 2, rows / 2)] * 2,
                ("colocated", 0): [(rows, rows), (0, 0)],
                ("colocated", 4): [(4 * rows, rows), (0, 0)]}
    for (encoder, steps), want in expected.items():
        cfg = load_config(args + ["--parallel.encoder", encoder] + (workers if steps else []))
        ranks = planner.plan_memory(cfg, microbatch_media=media)
        assert [(r.pixels_host, r.pixels) for r in ranks] == \
            [(host * P, device * P * 4) for host, device in want], (encoder, steps)
        result = planner.plan(cfg, media=planner.MediaMix.parse("2*1x8x8"), gpu=GPUS["h800"])
        assert not [kind for r in result.ranks for kind in r.comm if "pixel" in kind]
    one = load_config(["--data.uri", "synthetic", "--train.global_batch", "4"])
    (rank,) = planner.plan_memory(one, microbatch_media=media)  # one microbatch at a time
    assert (rank.pixels_host, rank.pixels) == (rows * P, largest_mb * P * 4)
