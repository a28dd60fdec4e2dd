"""K2.5's pipeline depth on CPU: a narrow 61-layer LM at pp=16 vpp=2, against one process.

    python benchmarks/pp16_layout.py [--steps 2]

Too heavy for CI on a 2-core machine (16 gloo ranks, about 80 s and 8 GB), so it lives here:
16 ranks train the narrow 61-layer model of tests/distributed/test_uneven_layout.py on
the automatic layout (32 chunks for 63 pieces: embedding + 61 layers + head) and the
single-process engine trains the same config; the table shows the layout, each step's
loss and grad norm on both, and the largest parameter difference (the equivalence tests'
tolerance is 1e-5).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.distributed.launcher import torchrun  # noqa: E402
from tests.distributed.test_uneven_layout import NARROW_61  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.train import SingleProcessEngine, train  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    base = ["--config", "configs/tiny.toml", "--data.uri", "synthetic", "--train.steps",
            str(args.steps), "--train.global_batch", "16", "--train.micro_batch", "1",
            "--data.seq_len", "32", "--data.max_image_patches_side", "4", "--optim.eps", "1e-6",
            "--optim.lr", "1e-3", "--optim.warmup_steps", "1", *NARROW_61]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(base + ["--job.run_dir", f"{tmp}/ref"])
        cfg.validate(world_size=1)
        engine = SingleProcessEngine(cfg.model, cfg.optim, cfg.train.micro_batch, cfg.train.seed)
        ref = train(cfg, engine=engine)
        ref_tensors = engine.named_parameters()
        out = Path(tmp) / "results.pt"
        torchrun("tests.distributed.equivalence_worker", 16, "--out", str(out), "--layouts",
                 "pp=16,vpp=2,encoder=dep", "--base", " ".join(base), timeout=1200)
        run = torch.load(out, weights_only=True)["pp=16,vpp=2,encoder=dep"]
    layout = load_config(base + ["--parallel.pp", "16", "--parallel.vpp", "2"]).pipeline_layout()
    print(f"layout (auto, pp=16 vpp=2): {layout.notation()}")
    print("| step | loss, 1 process | loss, 16 ranks | grad norm, 1 process | grad norm, 16 ranks |")
    print("| --- | --- | --- | --- | --- |")
    for step, (r, loss, norm) in enumerate(zip(ref, run["loss"], run["grad_norm"])):
        print(f"| {step} | {r['loss']:.7f} | {loss:.7f} | {r['grad_norm']:.6f} | {norm:.6f} |")
    diff = max((run["tensors"][n] - t).abs().max().item() for n, t in ref_tensors.items())
    print(f"largest parameter difference after {args.steps} steps: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
