"""Uneven pipeline layouts equal the single-process run: a narrow LM with K2.5's 61 layers.

61 is prime, so none of these layouts existed before parallel/layout.py. Three layouts
in one 4-rank launch, each against the single-process run of the same config:

    pp=4 vpp=2, auto                      the cost model's cut of E t*61 L into 8 chunks
    pp=4 vpp=2, "E|t|(t*12|)*4t*12|L"     an embedding-only chunk 0, a dense-only chunk, a
                                          head-only last chunk: three chunks without MoE
    pp=2 vpp=2 ep=2 dp=2, "E|t*30|t*31|L" with expert and data parallelism and DEP

The mutant drops the media embeddings on the embedding-only chunk and must fail.
Tolerances as in test_equivalence.py (and why).
"""
import pytest
import torch

from tests.distributed.launcher import torchrun
from tests.distributed.test_equivalence import mismatches
from trainer.config import load_config
from trainer.train import SingleProcessEngine, train

pytestmark = pytest.mark.slow

NARROW_61 = ["--model.lm.layers", "61", "--model.lm.hidden", "32", "--model.lm.heads", "2",
             "--model.lm.q_lora_rank", "16", "--model.lm.kv_lora_rank", "16",
             "--model.lm.qk_nope_head_dim", "8", "--model.lm.qk_rope_head_dim", "4",
             "--model.lm.v_head_dim", "8", "--model.lm.dense_hidden", "64",
             "--model.lm.num_experts", "4", "--model.lm.top_k", "2",
             "--model.lm.expert_hidden", "16", "--model.vision.hidden", "32",
             "--model.vision.heads", "2", "--model.vision.mlp_hidden", "64"]
BASE = ["--config", "configs/tiny.toml", "--data.uri", "synthetic", "--train.steps", "2",
        "--train.global_batch", "4", "--train.micro_batch", "1", "--data.seq_len", "32",
        "--data.max_image_patches_side", "4", "--data.edge_cases", "true",
        "--optim.warmup_steps", "1", "--optim.eps", "1e-6", "--optim.lr", "1e-3",
        "--optim.min_lr", "1e-4", *NARROW_61]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = load_config(BASE + ["--job.run_dir", str(tmp_path_factory.mktemp("ref"))])
    cfg.validate(world_size=1)
    engine = SingleProcessEngine(cfg.model, cfg.optim, cfg.train.micro_batch, cfg.train.seed)
    records = train(cfg, engine=engine)
    tensors = engine.named_parameters()
    tensors.update({n: b for n, b in engine.model.named_buffers() if n.endswith("router.bias")})
    return {"loss": [r["loss"] for r in records], "grad_norm": [r["grad_norm"] for r in records],
            "tensors": tensors}


def test_61_layers_on_uneven_layouts_equal_one_process(tmp_path, reference):
    explicit = "pp=4,vpp=2,encoder=dep,layout=E|t|(t*12|)*4t*12|L"
    good = ["pp=4,vpp=2,encoder=colocated", explicit,
            "pp=2,vpp=2,ep=2,dp=2,encoder=dep,layout=E|t*30|t*31|L"]
    mutants = [explicit + ",mutant=ignore_media"]
    out = tmp_path / "results.pt"
    torchrun("tests.distributed.equivalence_worker", 4, "--out", str(out),
             "--layouts", ";".join(good + mutants), "--base", " ".join(BASE))
    results = torch.load(out, weights_only=True)
    for layout in good:
        problems = mismatches(results[layout], reference)
        assert not problems, f"{layout}: " + "; ".join(problems[:8])
    for layout in mutants:
        assert mismatches(results[layout], reference), f"{layout}: the mutant went unnoticed"
