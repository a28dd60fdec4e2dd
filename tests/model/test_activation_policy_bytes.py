"""The activation model under a memory policy equals what the policy's own hooks account.

`model.activation_bytes.apply_policy` (what the planner counts) against
`model.saved_tensors.ActivationMemory` running the same policy on the modules: device and
host bytes alive after a forward (`memory.live`) and the bytes each layer saved
(`memory.saved`), for store-all, each tool of the `report` preset alone, `report` and
custom mixes (every region in FP8 per row, everything offloaded, offload on some layers,
everything recomputable recomputed with FP8 and offload on top), on LM chunks and on
the vision encoder. Tolerance 5% (the issue's); a mutant model that forgets one region's
treatment must miss by more, so the tolerance can tell.
"""

import pytest
import torch

from model import activation_bytes as ab
from model.config import preset
from model.lm import ChunkSpec
from model.memory_policy import (REPORT_FP8, REPORT_OFFLOAD, REPORT_RECOMPUTE, MemoryPolicy,
                                 all_regions, recomputable)
from model.saved_tensors import ActivationMemory
from model.vision_language import VisionEncoder
from tests.model.test_activation_bytes import chunk_and_inputs, wide

torch.set_num_threads(1)
TOLERANCE = 0.05
LOCAL = ab.ActivationSpec(dispatcher="local")
EVERY = all_regions()

POLICIES = {
    "none": MemoryPolicy.preset("none"),
    "recompute": MemoryPolicy(recompute=REPORT_RECOMPUTE),
    "fp8": MemoryPolicy(fp8=REPORT_FP8),
    "offload": MemoryPolicy(offload=REPORT_OFFLOAD),
    "report": MemoryPolicy.preset("report"),
    "fp8_rows_everywhere": MemoryPolicy(fp8=EVERY, fp8_scaling="row"),
    "offload_everything_on_layers_0_2": MemoryPolicy(offload=EVERY, offload_layers=(0, 2)),
    "all_tools_everywhere": MemoryPolicy(recompute=recomputable(), fp8=EVERY, offload=EVERY),
}


def close(model: int, got: int) -> bool:
    return abs(model - got) <= TOLERANCE * got


def measured_chunk(cfg, chunk: ChunkSpec, batch: int, seq_len: int, policy: MemoryPolicy,
                   group=None) -> ActivationMemory:
    """The policy's accounting after one forward (given labels: with the fused loss)."""
    lm, inputs = chunk_and_inputs(cfg, chunk, batch, seq_len, group=group)
    memory = ActivationMemory(policy)
    memory.attach(lm)
    memory.output = lm(*inputs)  # keeps the graph alive
    return memory


def assert_matches(memory: ActivationMemory, modelled: ab.PolicyBytes) -> None:
    device = modelled.device - modelled.layers[ab.OUTSIDE]["device"]  # no hook sees those
    assert close(device, memory.live["device"]), ("device", memory.live, device)
    assert close(modelled.host, memory.live["host"]), ("host", memory.live, modelled.host)
    for layer, regions in memory.saved.items():
        got = sum(regions.values())
        assert close(sum(modelled.layers[layer].values()), got), (layer, got,
                                                                  modelled.layers[layer])


CHUNKS = {"moe": ChunkSpec(False, range(1, 2), False),
          "dense": ChunkSpec(False, range(0, 1), False),
          "all": ChunkSpec(True, range(0, 3), True),
          "head": ChunkSpec(False, range(3, 3), True)}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("make_cfg, batch, seq_len", [(lambda: preset("tiny"), 1, 64),
                                                      (wide, 2, 96)], ids=["tiny", "wide"])
def test_lm_chunks(policy, chunk, make_cfg, batch, seq_len):
    cfg, spec = make_cfg(), CHUNKS[chunk]
    memory = measured_chunk(cfg, spec, batch, seq_len, POLICIES[policy])
    assert_matches(memory, ab.apply_policy(ab.lm_chunk(cfg.lm, spec, batch, seq_len, LOCAL),
                                           POLICIES[policy]))




@pytest.mark.parametrize("policy", ["none", "report", "all_tools_everywhere"])
def test_moe_layer_with_the_all_to_all_dispatcher(one_rank_group, policy):
    cfg, spec = wide(), CHUNKS["moe"]
    memory = measured_chunk(cfg, spec, 2, 64, POLICIES[policy], group=one_rank_group)
    assert_matches(memory, ab.apply_policy(
        ab.lm_chunk(cfg.lm, spec, 2, 64, ab.ActivationSpec()), POLICIES[policy]))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("make_cfg, grids", [
    (lambda: preset("tiny"), [(1, 4, 6), (2, 4, 4)]),
    (lambda: preset("small"), [(4, 8, 8), (1, 2, 2)])], ids=["tiny", "small"])
def test_vision_encoder(policy, make_cfg, grids):
    cfg = make_cfg()
    torch.manual_seed(0)
    encoder = VisionEncoder(cfg)
    memory = ActivationMemory(POLICIES[policy])
    memory.attach(encoder.vit, prefix="vision")
    patches = torch.randn(sum(t * h * w for t, h, w in grids), cfg.vision.patch_dim)
    out = encoder(patches, grids)
    modelled = ab.apply_policy(ab.vision_encoder(cfg, grids, LOCAL), POLICIES[policy])
    assert_matches(memory, modelled)
    assert out.requires_grad


@pytest.mark.parametrize("region", ["moe.experts", "moe.combine", "moe.attention"])
def test_a_model_forgetting_one_regions_treatment_misses(region):
    """The report policy measured; the model given the report without one of its
    treatments of `region` (recompute, FP8 or offload) must miss by more than 5%."""
    cfg, spec, report = preset("tiny"), CHUNKS["moe"], POLICIES["report"]
    memory = measured_chunk(cfg, spec, 1, 64, report)
    mutant = MemoryPolicy(report.recompute - {region}, report.fp8 - {region},
                          report.offload - {region})
    assert mutant != report
    modelled = ab.apply_policy(ab.lm_chunk(cfg.lm, spec, 1, 64, LOCAL), mutant)
    device = modelled.device - modelled.layers[ab.OUTSIDE]["device"]
    assert not (close(device, memory.live["device"])
                and close(modelled.host, memory.live["host"]))
