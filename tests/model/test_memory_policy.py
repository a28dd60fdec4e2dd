"""Memory policies (model/memory_policy.py, model/saved_tensors.py) on one process.

Recompute and offload change where activations live, never the numbers: the loss and every
gradient equal store-all's bit for bit (fp32 CPU). FP8 is lossy within E4M3's bound. The
policy's own accounting equals what autograd saves, parameters are never treated, the
routing decision and the expert load are the forward's, and an all-to-all inside a
recomputed region is refused.
"""

from unittest import mock

import pytest
import torch

import model.saved_tensors as saved_tensors
from model.config import preset
from model.fp8 import dequantise, quantise
from model.init import initialize
from model.lm import ChunkSpec, LanguageModelChunk
from model.memory_policy import (REGIONS, REPORT_RECOMPUTE, MemoryPolicy, MemoryPolicyError,
                                 all_regions)
from model.saved_tensors import ActivationMemory
from model.vision_language import VisionEncoder
from parallel.activation_memory import SavedTensorBytes
from parallel.expert_dispatch import AllToAllDispatcher

torch.set_num_threads(1)
CFG = preset("tiny")
RECOMPUTE = MemoryPolicy(recompute=REPORT_RECOMPUTE)
OFFLOAD_ALL = MemoryPolicy(offload=all_regions())
BOTH = MemoryPolicy(recompute=REPORT_RECOMPUTE, offload=all_regions())


# ------------------------------------------------------------------ FP8


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_fp8_round_trip_within_the_e4m3_bound(scaling):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.logspace(-3, 3, 64).unsqueeze(1)
    q = quantise(x, scaling)
    assert q.payload.dtype == torch.float8_e4m3fn and q.payload.element_size() == 1
    back = dequantise(q)
    scale = q.scale.expand_as(x) if scaling == "row" else q.scale
    # normal range: half an ulp of 3 mantissa bits; below it, half the smallest subnormal
    bound = torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10)
    assert ((back - x).abs() <= bound).all()
    assert ((back - x).abs() > 0).any()  # it is lossy: the bound is what is being tested


def test_fp8_of_zeros_and_empty_tensors():
    assert torch.equal(dequantise(quantise(torch.zeros(4, 3))), torch.zeros(4, 3))
    assert dequantise(quantise(torch.zeros(0, 3), "row")).shape == (0, 3)


# ------------------------------------------------------------------ policies


def test_policy_refuses_what_cannot_work():
    with pytest.raises(MemoryPolicyError, match="cannot be recomputed"):
        MemoryPolicy(recompute=frozenset({"moe.dispatch"}))
    with pytest.raises(MemoryPolicyError, match="unknown region 'moe.nope'"):
        MemoryPolicy(offload=frozenset({"moe.nope"}))
    with pytest.raises(MemoryPolicyError, match="memory.policy=custom"):
        MemoryPolicy.preset("report", fp8=["moe.experts"])
    assert MemoryPolicy.preset("none").stores_all


# ------------------------------------------------------------------ numbers


def lm_step(policy: MemoryPolicy | None, group=None):
    """One forward + backward of the whole tiny LM (with media embeddings and labels)."""
    torch.manual_seed(0)
    lm = LanguageModelChunk(CFG.lm, ChunkSpec.whole(CFG.lm))
    initialize(lm, 0)
    for moe in lm.moe_layers() if group is not None else []:
        moe.dispatcher = AllToAllDispatcher(group, CFG.lm.num_experts)
    memory = None
    if policy is not None:
        memory = ActivationMemory(policy)
        memory.attach(lm)
        memory.start_step()
    g = torch.Generator().manual_seed(1)
    B, S = 2, 64
    tokens = torch.randint(5, CFG.lm.vocab_size, (B, S), generator=g)
    positions = torch.arange(S).repeat(B, 1)
    docs = (torch.arange(S) // 20).repeat(B, 1)
    embeds = torch.randn(6, CFG.lm.hidden, generator=g, requires_grad=True)
    labels = torch.randint(0, CFG.lm.vocab_size, (B, S), generator=g)
    with SavedTensorBytes() as outer:
        loss = lm(tokens, positions, docs, embeds, torch.arange(3, 9), labels)
    peak = dict(memory.peak) if memory else None
    loss.backward()
    grads = {n: p.grad for n, p in lm.named_parameters()}
    loads = [moe.expert_load.clone() for moe in lm.moe_layers()]
    return {"loss": loss.detach(), "grads": grads, "embeds": embeds.grad, "loads": loads,
            "outer": outer.bytes, "peak": peak, "memory": memory, "lm": lm}


@pytest.fixture(scope="module")
def store_all():
    return lm_step(None)


def assert_bitwise(ref, out):
    assert torch.equal(ref["loss"], out["loss"])
    assert torch.equal(ref["embeds"], out["embeds"])
    differ = [n for n in ref["grads"] if not torch.equal(ref["grads"][n], out["grads"][n])]
    assert not differ, f"gradients differ from store-all: {differ}"


@pytest.mark.parametrize("policy", [RECOMPUTE, OFFLOAD_ALL, BOTH],
                         ids=["recompute", "offload", "recompute+offload"])
def test_recompute_and_offload_are_bitwise_store_all(store_all, policy):
    out = lm_step(policy)
    assert_bitwise(store_all, out)
    # nothing leaks: every saved byte is released by the backward
    assert out["memory"].live == {"device": 0, "host": 0}


def test_a_mutant_recompute_that_drifts_fails_the_bitwise_check(store_all, monkeypatch):
    """The bitwise check can tell: a recomputation one rounding away from the forward
    (the norm's output scaled by 1 + 2^-23) is caught."""
    from model import norm
    forward = norm.RMSNorm.forward

    def drifting(self, x):
        if saved_tensors.inside_region() and not saved_tensors.first_run_of_recomputed_region():
            return forward(self, x) * (1 + 2.0 ** -23)
        return forward(self, x)
    monkeypatch.setattr(norm.RMSNorm, "forward", drifting)
    with pytest.raises(AssertionError):
        assert_bitwise(store_all, lm_step(RECOMPUTE))


def test_store_all_accounting_equals_what_autograd_saves(store_all):
    out = lm_step(MemoryPolicy.preset("none"))
    assert_bitwise(store_all, out)
    measured = store_all["outer"]  # no policy: the outer hooks see every saved tensor
    assert abs(out["peak"]["device"] - measured) <= 0.001 * measured
    per_layer = sum(sum(r.values()) for r in out["memory"].saved.values())
    assert abs(per_layer - measured) <= 0.001 * measured


def test_report_keeps_at_most_40_percent_on_the_device(store_all):
    out = lm_step(MemoryPolicy.preset("report"))
    none = lm_step(MemoryPolicy.preset("none"))["peak"]["device"]
    assert out["peak"]["device"] <= 0.40 * none, (out["peak"], none)
    assert out["peak"]["host"] > 0
    torch.testing.assert_close(out["loss"], store_all["loss"])  # the forward is store-all's


def test_routing_and_expert_load_are_the_forwards(store_all):
    out = lm_step(MemoryPolicy.preset("report"))
    for ref, now in zip(store_all["loads"], out["loads"]):
        assert torch.equal(ref, now)  # counted once, in the forward, and the same choice


def test_parameters_are_never_offloaded_or_compressed(monkeypatch):
    treated = []
    stash, quant = saved_tensors.OffloadPool.stash, saved_tensors.quantise
    monkeypatch.setattr(saved_tensors.OffloadPool, "stash", lambda self, parts, key: (
        treated.extend(parts), stash(self, parts, key))[1])
    monkeypatch.setattr(saved_tensors, "quantise", lambda t, s: (treated.append(t), quant(t, s))[1])
    out = lm_step(MemoryPolicy(fp8=all_regions() - {"moe.combine"}, offload=all_regions()))
    params = {p.untyped_storage().data_ptr() for p in out["lm"].parameters()}
    assert treated and not [t for t in treated if t.untyped_storage().data_ptr() in params]


def test_a_mutant_that_treats_parameters_is_caught(monkeypatch):
    monkeypatch.setattr(ActivationMemory, "is_parameter", lambda self, t: False)
    with pytest.raises(AssertionError):
        test_parameters_are_never_offloaded_or_compressed(monkeypatch)


def test_offload_moves_bytes_to_the_host_pool_and_back(store_all):
    out = lm_step(OFFLOAD_ALL)
    assert out["peak"]["host"] >= store_all["outer"]  # all of it (plus copies of shared views)
    assert out["peak"]["device"] == 0


def test_vision_encoder_recompute_and_offload_bitwise():
    def run(policy):
        torch.manual_seed(0)
        encoder = VisionEncoder(CFG)
        initialize(encoder, 0, prefix="vision")
        if policy is not None:
            ActivationMemory(policy).attach(encoder)
        grids = [(1, 4, 6), (2, 4, 4)]
        patches = torch.randn(sum(t * h * w for t, h, w in grids), CFG.vision.patch_dim,
                              generator=torch.Generator().manual_seed(2))
        encoder(patches, grids).square().sum().backward()
        return {n: p.grad for n, p in encoder.named_parameters()}
    ref = run(None)
    for policy in (RECOMPUTE, OFFLOAD_ALL):
        now = run(policy)
        assert all(torch.equal(ref[n], now[n]) for n in ref)


# ------------------------------------------------------------------ communication




def test_a_policy_that_recomputes_an_all_to_all_fails(one_rank_group, monkeypatch):
    """A mutant catalogue that lets `moe.dispatch` (the expert all-to-all and its count
    exchange) be recomputed: the dispatcher refuses to run inside the region."""
    monkeypatch.setitem(REGIONS, "moe", {**REGIONS["moe"], "dispatch": True})
    with pytest.raises(RuntimeError, match="inside the recomputed region 'moe.dispatch'"):
        lm_step(MemoryPolicy(recompute=frozenset({"moe.dispatch"})), one_rank_group)
    # the same model and dispatcher with the report policy run (the regions avoid it)
    lm_step(MemoryPolicy.preset("report"), one_rank_group)


def test_fp8_and_offload_compose_the_compressed_bytes_travel(store_all):
    plain = lm_step(MemoryPolicy(offload=frozenset({"moe.experts"})))["memory"].saved
    both = lm_step(MemoryPolicy(fp8=frozenset({"moe.experts"}),
                                offload=frozenset({"moe.experts"})))
    for layer, regions in plain.items():
        if "experts" in regions:  # fp32 -> 1 byte per element (+ scales, int offsets as is)
            assert both["memory"].saved[layer]["experts"] < 0.3 * regions["experts"]
    assert both["peak"]["host"] > 0


@pytest.mark.parametrize("policy", [MemoryPolicy(offload=frozenset({"dense.attention"})),
                                    MemoryPolicy(fp8=frozenset({"dense.attention"}))])
def test_a_tensor_saved_twice_in_a_region_is_copied_once_other_bytes_never_shared(policy):
    """softmax saves its output [2, 3, 4, 4], the batched product the same bytes as
    [6, 4, 4]: one copy. Two halves of one storage (same size, other offsets) are other
    bytes, and so, under FP8 with a scale per row, is a reshape with other rows: copies of
    their own. Gradients equal
    those of the same region under the same policy with no sharing at all (each save its
    own copy), bit for bit; the bytes saved are the copies made."""
    from model.saved_tensors import LayerMemory

    def run(share: bool):
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
        v = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)

        def region(x, v):
            p = x.softmax(-1)
            flat = x.reshape(-1)
            half = flat.numel() // 2
            return (torch.bmm(p.reshape(6, 4, 4), v).sum() + (flat[:half] * flat[half:]).sum()
                    + (x.transpose(-1, -2) @ x).sum() + (x.reshape(24, 4) @ x.reshape(4, 24)).sum())
        memory = ActivationMemory(policy)
        with mock.patch.object(saved_tensors, "_bytes_read",
                               saved_tensors._bytes_read if share else lambda t, rows: object()):
            LayerMemory(memory, "dense", "layers.0", 0).region("attention", region, x, v).backward()
        return x.grad, v.grad, memory.saved["layers.0"]["attention"]

    (gx, gv, shared_bytes), (gx0, gv0, unshared_bytes) = run(True), run(False)
    assert torch.equal(gx, gx0) and torch.equal(gv, gv0)
    # copies not made: offload, p's second and x's as [24, 4] and [4, 24] (x is saved whole
    # by the transposed product first), 3 x 96 fp32; FP8, p's second and x as [24, 4] (rows of
    # 4, as x's first save; [4, 24] has rows of 24: its own scales), 2 x (96 + 24 row scales)
    assert unshared_bytes - shared_bytes == (3 * 96 * 4 if policy.offload else 2 * (96 + 24 * 4))
