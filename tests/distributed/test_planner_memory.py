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
    pixels                    on the demo dataset (the streaming loader's uint8 pixels; the
                              synthetic source makes fp32 ones, which the plan does not model):
                              the uint8 patches of the step's batch and the fp32 normalised
                              copy the encoder reads. Colocated: exactly, per rank (stage 0
                              its replica's, stage 1 none). DEP: the job's sum exactly, and
                              each rank within one largest item of the mean share the plan
                              takes (LPT's bound: the plan assumes a perfect balance)

Mutants of the planner must fail the same comparison: one microbatch in flight instead
of the schedule's count, optimizer state not sharded over the data-parallel group, the
colocated encoder left out, a planner blind to the job's memory policy, and the pixels of
the data path before issue 17 (every rank of a replica holding all its pixels as fp32
rows), uint8 pixels counted at 4 bytes, and steps decoded ahead counted without workers.
"""
from __future__ import annotations

import pytest
import torch

from dataloader.config import LoaderConfig
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
DATASET = ["--data.max_patches_per_image", "64"]  # + --data.uri: the demo dataset
LAYOUTS = ["pp=2,vpp=2,ep=2,dp=2,encoder=dep",
           "pp=4,wide=1,encoder=dep",
           "pp=2,vpp=2,dp=2,wide=1,encoder=colocated,layout=E|tt|t|tL",
           "pp=2,dp=2,ep=2,encoder=dep,media=0",
           "pp=2,vpp=2,ep=2,dp=2,encoder=dep,memory=report",
           "pp=2,dp=2,encoder=dep,data=demo",
           "pp=2,dp=2,encoder=colocated,data=demo"]
TOLERANCE = 0.05


def config(layout: str):
    items = dict(item.split("=") for item in layout.split(","))
    argv = BASE + (WIDE if items.get("wide") == "1" else [])
    argv += ["--data.media_per_seq", "0"] if items.get("media") == "0" else []
    argv += DATASET if items.get("data") == "demo" else []  # the pixel model ignores data.uri
    for key in ("pp", "vpp", "ep", "dp", "encoder", "layout"):
        if key in items:
            argv += [f"--parallel.{key}", items[key]]
    argv += ["--memory.policy", items["memory"]] if "memory" in items else []
    return load_config(argv)


@pytest.fixture(scope="module")
def measured(tmp_path_factory, demo_dataset):
    out = tmp_path_factory.mktemp("planner") / "figures.pt"
    torchrun("tests.distributed.planner_memory_worker", 4, "--out", str(out),
             "--layouts", ";".join(LAYOUTS), "--base", " ".join(BASE), "--wide", " ".join(WIDE),
             "--dataset", " ".join(DATASET + ["--data.uri", str(demo_dataset)]))
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
    if "data=demo" in layout:
        problems += pixel_mismatches(layout, ranks, predicted)
    return problems


def pixel_mismatches(layout: str, ranks: list[dict], predicted: dict[int, list[planner.RankPlan]]
                     ) -> list[str]:
    """Colocated: every rank exactly. DEP: the plan gives each rank of a replica an equal
    share of that replica's media (the mean over the DEP group; that each stage gets the
    same share is tests/trainer/test_planner.py's); LPT leaves every rank within one item
    of the mean, and the ranks together hold every item once."""
    cfg = config(layout)
    largest = max(t * h * w for got in ranks for items in got["media"] for t, h, w in items)
    problems = []
    for kind, measured, attr, itemsize in (("uint8 pixels", "pixels_host", "pixels_host", 1),
                                           ("normalised pixels", "pixels_device", "pixels", 4)):
        got = [g[measured] for g in ranks]
        want = [getattr(predicted[g["dp_rank"]][g["pp_rank"]], attr) for g in ranks]
        where = [f"{layout}, pipeline rank {g['pp_rank']} of replica {g['dp_rank']}"
                 for g in ranks]
        if cfg.parallel.encoder == "colocated":
            problems += [f"{w}: {kind} {a} held, {b} planned"
                         for w, a, b in zip(where, got, want) if a != b]
            continue
        if sum(got) != sum(want):
            problems.append(f"{layout}: {kind} of all ranks {sum(got)} held, {sum(want)} planned")
        mean, slack = sum(want) / len(want), largest * cfg.model.vision.patch_dim * itemsize
        problems += [f"{w}: {kind} {a} held, the planned share {mean:.0f} (+-{slack})"
                     for w, a in zip(where, got) if abs(a - mean) > slack]
    return problems


def fp32_rows_everywhere(job, pp_rank: int) -> tuple[float, float]:
    """The pixel model before issue 17: every rank of a replica held all its pixels as
    fp32 rows (DEP ranks their share again, colocated stage 0 a copy); no uint8."""
    replica = sum(t * h * w for t, h, w in job.replica_items)
    return 0, replica * (1 + (job.share if job.mode == "dep" else 1))


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
    for layout in LAYOUTS[5:]:  # the dataset's pixels reached the ranks that encode them
        assert all(got["pixels_host"] > 0 for got in measured[layout] if got["pp_rank"] == 0)


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
    for layout in LAYOUTS[5:]:
        for name, value in (("_pixel_rows", fp32_rows_everywhere),  # before issue 17
                            ("UINT8", 4)):  # uint8 pixels counted as fp32
            with monkeypatch.context() as m:
                m.setattr(planner, name, value)
                assert pixel_mismatches(layout, measured[layout],
                                        predicted(layout, measured[layout])), name
        with monkeypatch.context() as m:  # data.prefetch steps counted without loader workers
            m.setattr(LoaderConfig, "steps_decoded_ahead", property(lambda self: self.prefetch))
            assert pixel_mismatches(layout, measured[layout], predicted(layout, measured[layout]))
