"""The planner's bytes equal what running jobs hold, per pipeline rank (4 gloo ranks).

For each layout (tiny and a wider model; interleaved and plain 1F1B; DEP with media and
without, the encoder colocated on stage 0; an uneven explicit layout) one training step
runs with probes (tests/trainer/memory_probe.py) and the figures of every rank are
compared with `trainer.planner.plan_memory` for the same config and the media each
microbatch held (stage 0 records them; the plan otherwise draws them from a mix):

    weights, gradients        exactly (bytes of the parameters and their .grad; without
                              media the encoder gets no .grad today, which the plan counts)
    optimizer state           exactly (ZeRO-1's own `state_bytes()`, bucket padding included)
    activations + buffers     within 5% of the measured peak: bytes saved for backward
                              (the memory policy's accounting: device and host) plus the
                              chunk outputs, summed over the forwards in flight, at the worst
                              moment of the rank's schedule; under `report` too
    DEP recomputation         within 5%: the encoder's saved bytes for the items the rank
                              encoded (model/activation_bytes.py on those items, under the
                              job's policy)

Mutants of the planner must fail the same comparison: one microbatch in flight instead
of the schedule's count, optimizer state not sharded over the data-parallel group, the
colocated encoder left out, and a planner blind to the job's memory policy.
"""
from __future__ import annotations

import pytest
import torch

from model.activation_bytes import OUTSIDE, ActivationSpec, apply_policy, vision_encoder
from model.memory_policy import MemoryPolicy
from tests.distributed.launcher import torchrun
from trainer import planner
from trainer.config import load_config

pytestmark = pytest.mark.slow

BASE = ["--config", "configs/tiny.toml", "--data.uri", "synthetic", "--train.steps", "1",
        "--train.global_batch", "8", "--train.micro_batch", "1", "--data.seq_len", "128",
        "--data.max_image_patches_side", "8", "--optim.warmup_steps", "1",
        "--parallel.ep_overlap", "false"]  # the probe measures the plain forward
WIDE = ["--model.lm.hidden", "512", "--model.lm.heads", "8", "--model.lm.q_lora_rank", "192",
        "--model.lm.kv_lora_rank", "128", "--model.lm.qk_nope_head_dim", "64",
        "--model.lm.qk_rope_head_dim", "32", "--model.lm.v_head_dim", "64",
        "--model.lm.dense_hidden", "1536", "--model.lm.num_experts", "8", "--model.lm.top_k", "2",
        "--model.lm.expert_hidden", "256", "--model.lm.vocab_size", "4096"]
LAYOUTS = ["pp=2,vpp=2,ep=2,dp=2,encoder=dep",
           "pp=4,wide=1,encoder=dep",
           "pp=2,vpp=2,dp=2,wide=1,encoder=colocated,layout=E|tt|t|tL",
           "pp=2,dp=2,ep=2,encoder=dep,media=0",
           "pp=2,vpp=2,ep=2,dp=2,encoder=dep,memory=report"]
TOLERANCE = 0.05


def config(layout: str):
    items = dict(item.split("=") for item in layout.split(","))
    argv = BASE + (WIDE if items.get("wide") == "1" else [])
    argv += ["--data.media_per_seq", "0"] if items.get("media") == "0" else []
    for key in ("pp", "vpp", "ep", "dp", "encoder", "layout"):
        if key in items:
            argv += [f"--parallel.{key}", items[key]]
    argv += ["--memory.policy", items["memory"]] if "memory" in items else []
    return load_config(argv)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("planner") / "figures.pt"
    torchrun("tests.distributed.planner_memory_worker", 4, "--out", str(out),
             "--layouts", ";".join(LAYOUTS), "--base", " ".join(BASE), "--wide", " ".join(WIDE))
    return torch.load(out, weights_only=True)


def mismatches(layout: str, ranks: list[dict], predicted: dict[int, list[planner.RankPlan]]
               ) -> list[str]:
    problems = []
    cfg = config(layout)
    for got in ranks:
        want = predicted[got["dp_rank"]][got["pp_rank"]]
        where = f"{layout}, pipeline rank {got['pp_rank']} of replica {got['dp_rank']}"
        # gradients live in ZeRO-1's persistent flat buffers: held (and planned) whole even
        # when a step gives the encoder nothing (media=0)
        for name, key in (("weights", "weights"), ("grads", "grads"), ("state", "state")):
            if got[name] != want.total(key):
                problems.append(f"{where}: {name} {got[name]} held, {want.total(key)} planned")
        planned = want.activations + want.offloaded + want.pipeline_buffers
        if abs(planned - got["peak"]) > TOLERANCE * got["peak"]:
            problems.append(f"{where}: activations {got['peak']} at the peak, {planned} planned")
        for saved, grids in got["recompute"]:
            placed = apply_policy(vision_encoder(cfg.model, grids, ActivationSpec()),
                                  cfg.memory.to_policy())  # what the policy's hooks see
            modelled = placed.device + placed.host - placed.layers[OUTSIDE]["device"]
            if abs(modelled - saved) > TOLERANCE * max(saved, 1):
                problems.append(f"{where}: DEP recompute saved {saved}, modelled {modelled}")
    return problems


def predicted(layout: str, ranks: list[dict]) -> dict[int, list[planner.RankPlan]]:
    """Per replica, the plan for the media its stage 0 saw."""
    cfg = config(layout)
    return {got["dp_rank"]: planner.plan_memory(cfg, microbatch_media=got["media"])
            for got in ranks if got["pp_rank"] == 0}


def test_planned_bytes_equal_the_running_jobs(measured):
    for layout in LAYOUTS:
        assert len(measured[layout]) == 4
        problems = mismatches(layout, measured[layout], predicted(layout, measured[layout]))
        assert not problems, "; ".join(problems)
    assert any(got["recompute"] for got in measured[LAYOUTS[0]])  # DEP encoded media
    assert any(items for got in measured[LAYOUTS[2]] for items in got["media"])  # colocated


def test_planner_mutants_are_caught(measured, monkeypatch):
    layout = LAYOUTS[0]
    with monkeypatch.context() as m:  # one microbatch in flight instead of the schedule's
        peak = planner.peak_in_flight
        m.setattr(planner, "peak_in_flight", lambda actions, held: peak(
            [a for a in actions if a.microbatch == 0], held))
        assert mismatches(layout, measured[layout], predicted(layout, measured[layout]))
    with monkeypatch.context() as m:  # ZeRO-1 state not sharded over data parallelism
        zero1 = planner.zero1_bytes
        m.setattr(planner, "zero1_bytes", lambda named, size, *a: zero1(named, 1, *a))
        assert mismatches(layout, measured[layout], predicted(layout, measured[layout]))
    layout = LAYOUTS[4]
    with monkeypatch.context() as m:  # the job's memory policy ignored
        place = planner.apply_policy
        m.setattr(planner, "apply_policy", lambda entries, policy: place(entries,
                                                                         MemoryPolicy()))
        assert mismatches(layout, measured[layout], predicted(layout, measured[layout]))
    layout = LAYOUTS[2]
    with monkeypatch.context() as m:  # the colocated encoder's activations left out
        m.setattr(planner, "vision_encoder", lambda *args: [])
        assert mismatches(layout, measured[layout], predicted(layout, measured[layout]))
