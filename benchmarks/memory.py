"""Benchmark: activation memory policies side by side (issue 15).

    python -m benchmarks.memory [--configs tiny,small] [--rounds 3] [--steps 2]
                                [--small-layers 2] [--seq-len 128] [--device cpu]

Per config, one process (one thread) trains the whole language model (embedding, decoder
layers, fused head + loss; `small` cut to its first --small-layers layers: one dense, the
rest MoE) with plain SGD (no optimizer state to hold or time) on fixed random batches
of one sequence. Variants, run in turn round after round (A B C D E A B C D E ...),
each from the same initial weights:

    none       store every saved tensor (the hooks still account the bytes)
    recompute  the report preset's recompute list alone (norms, SwiGLU, MLA up-projections,
               the head's loss)
    fp8        its FP8 list alone (expert and shared-expert inputs)
    offload    its offload list alone (attention, o_proj, MoE combine)
    report     all three (model/memory_policy.py)

Printed per variant (bytes from the policy's own accounting, model/saved_tensors.py):

    saved MiB dev/host   bytes kept for backward by one microbatch's forward, on the device
                         and in the offload pool (CPU: a second set of CPU tensors)
    of none              (device + host) / none's: the issue's goal for report is <= 40%;
                         "dev of none": device bytes alone / none's
    dense, moe, head     saved KiB per layer, device/host: the dense layer 0, the mean MoE
                         layer, the head's loss region
    model MiB            model/activation_bytes.py's prediction of saved dev + host (planner)
    peak MiB dev/host    the most alive at once over a step (forward, then backward, which
                         brings offloaded tensors back: fetched on demand here, no pipeline)
    step ms              forward + backward, median over rounds and steps
    loss, dloss          the loss of the last step, and its difference from none's

CPU timings show the tools' costs on a CPU only: recompute reruns its regions, FP8
quantises and dequantises, offload copies twice; none of it overlaps anything here.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch

from model import activation_bytes as ab
from model.config import preset, replace
from model.init import initialize
from model.lm import ChunkSpec, LanguageModelChunk
from model.memory_policy import MemoryPolicy, report_tools
from model.saved_tensors import ActivationMemory
from trainer.profile import format_columns

MiB, KiB = 2 ** 20, 2 ** 10
HEADER = ("config", "policy", "saved MiB dev/host", "of none", "dev of none",
          "dense KiB", "moe KiB", "head KiB", "model MiB", "peak MiB dev/host", "step ms",
          "loss", "dloss")


def model_config(name: str, small_layers: int):
    cfg = preset(name)
    if name == "small":
        cfg = replace(cfg, lm=replace(cfg.lm, layers=small_layers))
    return cfg.lm


def batches(lm_cfg, steps: int, seq_len: int, device) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        tokens = torch.randint(5, lm_cfg.vocab_size, (1, seq_len + 1), generator=gen)
        out.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device)))
    return out


def split(memory: ActivationMemory, model: LanguageModelChunk) -> dict[str, dict[str, int]]:
    """memory.saved per layer, split into device and host by the regions' treatment."""
    types = {f"layers.{i}": "moe" if layer.is_moe else "dense"
             for i, layer in model.layers.items()} | {"head": "head"}
    out = {}
    for layer, regions in memory.saved.items():
        index = int(layer.split(".")[1]) if layer.startswith("layers.") else None
        row = {"device": 0, "host": 0}
        for region, nbytes in regions.items():
            offload = memory.policy.treatment(types[layer], region, index)[2]
            row["host" if offload else "device"] += nbytes
        out[layer] = row
    return out


def run_variant(model, init_state, policy: MemoryPolicy, data, device) -> dict:
    gc.collect()
    model.load_state_dict(init_state)
    for moe in model.moe_layers():
        moe.reset_buffers()
    memory = ActivationMemory(policy, device)
    memory.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    S = data[0][0].shape[1]
    positions = torch.arange(S, device=device).unsqueeze(0)
    docs = torch.zeros(1, S, dtype=torch.long, device=device)
    result = {"step": []}
    for i, (tokens, labels) in enumerate(data):
        memory.start_step()
        sync(device)
        start = time.perf_counter()
        loss = model(tokens, positions, docs, None, None, labels) / S
        if i == 0:
            result["after_forward"] = dict(memory.live)
        loss.backward()
        sync(device)
        result["step"].append(time.perf_counter() - start)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result["loss"] = loss.item()
        if i == 0:
            result["layers"] = split(memory, model)
            result["peak"] = dict(memory.peak)
    del optimizer, memory
    return result


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench(config: str, args) -> list[tuple]:
    lm_cfg = model_config(config, args.small_layers)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = LanguageModelChunk(lm_cfg, ChunkSpec.whole(lm_cfg)).to(device)
    initialize(model, 0)
    init_state = copy.deepcopy(model.state_dict())
    data = batches(lm_cfg, args.steps, args.seq_len, device)
    policies = report_tools()
    runs: dict[str, list[dict]] = {name: [] for name in policies}
    run_variant(model, init_state, policies["none"], data[:1], device)  # warm-up, untimed
    for _ in range(args.rounds):
        for name, policy in policies.items():
            runs[name].append(run_variant(model, init_state, policy, data, device))
    spec = ab.ActivationSpec(dispatcher="local")
    entries = ab.lm_chunk(lm_cfg, ChunkSpec.whole(lm_cfg), 1, args.seq_len, spec)
    rows, none = [], None
    dense = [f"layers.{i}" for i in range(min(lm_cfg.first_k_dense, lm_cfg.layers))]
    moe = [f"layers.{i}" for i in range(lm_cfg.first_k_dense, lm_cfg.layers)]
    for name, policy in policies.items():
        first = runs[name][0]
        layers = first["layers"]
        dev, host = first["after_forward"]["device"], first["after_forward"]["host"]
        none = none or (dev, host, first["loss"])
        modelled = ab.apply_policy(entries, policy)
        hooked = modelled.device - modelled.layers[ab.OUTSIDE]["device"] + modelled.host

        def kib(names):
            if not names:
                return "-"
            d = sum(layers[n]["device"] for n in names) / len(names)
            h = sum(layers[n]["host"] for n in names) / len(names)
            return f"{d / KiB:.0f}/{h / KiB:.0f}"
        step = statistics.median(t for r in runs[name] for t in r["step"])
        rows.append((config, name, f"{dev / MiB:.2f}/{host / MiB:.2f}",
                     f"{(dev + host) / sum(none[:2]):.0%}", f"{dev / sum(none[:2]):.0%}",
                     kib(dense), kib(moe), kib(["head"]),
                     f"{hooked / MiB:.2f}",
                     f"{first['peak']['device'] / MiB:.2f}/{first['peak']['host'] / MiB:.2f}",
                     f"{step * 1e3:.0f}", f"{first['loss']:.6f}",
                     f"{first['loss'] - none[2]:+.2e}"))
        assert all(r["loss"] == first["loss"] for r in runs[name]), "rounds differ"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--small-layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for config in args.configs.split(","):
        rows += bench(config, args)
    print(f"one sequence of {args.seq_len} tokens per step, fp32, {args.steps} steps x "
          f"{args.rounds} rounds per policy (interleaved), {args.device}, 1 thread; small: "
          f"first {args.small_layers} layers; bytes of the first step", flush=True)
    print(format_columns(HEADER, rows), flush=True)


if __name__ == "__main__":
    main()
