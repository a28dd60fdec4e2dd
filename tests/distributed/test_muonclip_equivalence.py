"""MuonClip on a parallel layout equals the single-process MuonClip run.

pp=2 vpp=2 ep=2 dp=2 with DEP and small ZeRO-1 buckets: every dense and expert bucket of
the Muon groups is cut by the dp=2 / expert-DP shard boundary, so matrices straddle
shards (the mutant below proves some do); tau is set so that about half of the heads are
clipped every step (their max logits are ~0.15-0.22 in this tiny run). The reference is
the single-process engine, whose MuonClip runs on a ZeRO-1 of one. Mutants: Newton-Schulz
of only the local part of a cut matrix, and QK-Clip with the replica's own max logits
instead of the data-parallel maximum, must both fail the comparison.

One collective for the step's model statistics: every rank issues exactly two all-reduces
per step on its data-parallel group, the global token count and the statistics (router
loads of all its MoE layers and max logits of all its attention layers; this layout puts
one or two of each on every rank). The old per-layer reductions (mutant
per_layer_statistics, numerically the same run, one step) issue three or four.
"""
import pytest
import torch

from tests.distributed.test_equivalence import BASE, check, launch
from trainer.config import load_config
from trainer.train import SingleProcessEngine, train

MUONCLIP = BASE + ["--optim.name", "muonclip", "--optim.qk_clip_tau", "0.18"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = load_config(MUONCLIP + ["--job.run_dir", str(tmp_path_factory.mktemp("ref"))])
    cfg.validate(world_size=1)
    engine = SingleProcessEngine(cfg.model, cfg.optim, cfg.train.micro_batch, cfg.train.seed)
    clipped = []
    set_max_logits = engine.clip.set_max_logits

    def spy(max_logits):
        clipped.append(sum(int((m > cfg.optim.qk_clip_tau).sum()) for m in max_logits.values()))
        set_max_logits(max_logits)

    engine.clip.set_max_logits = spy
    records = train(cfg, engine=engine)
    heads = cfg.model.lm.heads * cfg.model.lm.layers
    assert all(0 < n < heads for n in clipped), f"heads clipped per step: {clipped} of {heads}"
    tensors = engine.named_parameters()
    tensors.update({n: b for n, b in engine.model.named_buffers() if n.endswith("router.bias")})
    return {"loss": [r["loss"] for r in records], "grad_norm": [r["grad_norm"] for r in records],
            "tensors": tensors}


@pytest.mark.slow
def test_muonclip_four_ranks_pp_vpp_ep_dp_dep(tmp_path, reference):
    layout = "pp=2,vpp=2,ep=2,dp=2,encoder=dep,bucket=20000"
    mutants = [layout + ",mutant=local_newton_schulz", layout + ",mutant=local_max_logit"]
    per_layer = layout + ",mutant=per_layer_statistics,steps=1"
    results = launch(tmp_path, 4, [layout] + mutants + [per_layer], MUONCLIP)
    check(results, reference, [layout], mutants)
    assert results[layout]["dp_all_reduces_per_step"] == [2] * 4
    assert all(n > 2 for n in results[per_layer]["dp_all_reduces_per_step"]), results[per_layer]
