"""CUDA-only checks of the GPU path (run by benchmarks/gpu_check.sh on a GPU machine).

Every test here is marked `cuda` and skipped, with the reason printed (`-rs` in
pytest.ini), where torch sees no GPU. They compare the CUDA kernels with the CPU
reference implementations the rest of the suite already trusts:

    varlen attention (document-causal, per-item)   vs the dense-mask SDPA, fp32 on CPU
    grouped expert GEMMs in bf16                    vs one matmul per expert
    a whole training step on CUDA (fp32)            vs the same step on CPU
    transformer-engine kernels (when installed)     vs the plain torch modules
    CUDA-event step timing                          every span inside the step, ordered
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model.attention import DocumentMask, document_attention, packed_causal_mask, segment_attention
from model.config import preset
from model.grouped_experts import grouped_linear

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: run benchmarks/gpu_check.sh on a GPU machine")]

DEVICE = "cuda"


def packed_doc_ids(S: int, lengths: list[list[int]]) -> torch.Tensor:
    rows = []
    for row in lengths:
        ids = torch.cat([torch.full((n,), d) for d, n in enumerate(row)])
        rows.append(torch.cat([ids, torch.full((S - len(ids),), -1)]))
    return torch.stack(rows)


@pytest.mark.parametrize("qk_dim, v_dim", [(192, 128), (64, 64)])
def test_varlen_document_attention_equals_dense_reference(qk_dim, v_dim):
    torch.manual_seed(0)
    B, H, S = 2, 4, 256
    doc_ids = packed_doc_ids(S, [[1, 100, 37, 60], [200, 1, 40]])  # incl. 1-token documents
    q, k = (torch.randn(B, H, S, qk_dim) for _ in range(2))
    v = torch.randn(B, H, S, v_dim)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=packed_causal_mask(doc_ids), scale=qk_dim ** -0.5)
    got = document_attention(*(t.to(DEVICE, torch.bfloat16) for t in (q, k, v)),
                             DocumentMask(doc_ids.to(DEVICE)), qk_dim ** -0.5)
    torch.testing.assert_close(got.float().cpu(), want, atol=2e-2, rtol=2e-2)


def test_varlen_segment_attention_equals_per_item_reference():
    torch.manual_seed(0)
    lengths = [16, 64, 1, 144, 16]
    q, k, v = (torch.randn(sum(lengths), 4, 72) for _ in range(3))
    want = segment_attention(q, k, v, lengths)  # CPU reference (batched per length)
    got = segment_attention(*(t.to(DEVICE, torch.bfloat16) for t in (q, k, v)), lengths)
    torch.testing.assert_close(got.float().cpu(), want, atol=2e-2, rtol=2e-2)


def test_grouped_gemm_in_bf16_equals_per_expert_matmuls():
    torch.manual_seed(0)
    rows = torch.tensor([5, 0, 130, 7, 1, 0, 64, 33])  # empty experts too
    x = torch.randn(int(rows.sum()), 256, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(8, 512, 256, device=DEVICE, dtype=torch.bfloat16)
    got = grouped_linear(x, weight, rows.to(DEVICE).cumsum(0).to(torch.int32))
    want = torch.cat([xi.float() @ weight[e].float().t()
                      for e, xi in enumerate(x.split(rows.tolist()))])
    torch.testing.assert_close(got.float(), want, atol=0.5, rtol=2e-2)


def test_training_step_on_cuda_equals_cpu():
    """tiny, fp32, two steps: CUDA (varlen only applies to bf16, so fp32 runs the same
    kernels' math) against CPU, within TF32-free fp32 tolerance."""
    from trainer.config import load_config
    from trainer.single_process import SingleProcessEngine
    from trainer.data import build_data

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = load_config(["--data.uri", "synthetic", "--data.seq_len", "64",
                       "--train.global_batch", "4"])
    results = {}
    for device in ("cpu", DEVICE):
        engine = SingleProcessEngine(cfg.model, cfg.optim, cfg.train.micro_batch, 0, device)
        data = build_data(cfg, 0, 1)
        results[device] = [engine.step(data.next_batch(), 1e-3) for _ in range(2)]
    for (loss_cpu, norm_cpu), (loss_gpu, norm_gpu) in zip(results["cpu"], results[DEVICE]):
        assert abs(loss_cpu - loss_gpu) <= 1e-4 * abs(loss_cpu)
        assert abs(norm_cpu - norm_gpu) <= 1e-3 * abs(norm_cpu)


def test_transformer_engine_kernels_equal_plain_modules():
    from model import te_kernels
    if not te_kernels.available():
        pytest.skip("transformer-engine is not installed (pip install -e '.[gpu]')")
    from model.lm import LanguageModelChunk
    from model.init import materialize

    cfg = dataclasses.replace(preset("small").lm, layers=2)
    with torch.device("meta"):
        plain, fused = LanguageModelChunk(cfg), LanguageModelChunk(cfg, te=True)
    materialize(plain, DEVICE, 0).to(torch.bfloat16)
    materialize(fused, DEVICE, 0).to(torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (2, 512), device=DEVICE)
    positions = torch.arange(512, device=DEVICE).expand(2, 512)
    doc_ids = packed_doc_ids(512, [[300, 212], [512]]).to(DEVICE)
    want = plain(tokens, positions, doc_ids).float()
    got = fused(tokens, positions, doc_ids).float()
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


def test_step_clock_times_kernels_not_launches():
    from parallel.step_clock import StepClock

    clock = StepClock(DEVICE)
    clock.start()
    a = torch.randn(4096, 4096, device=DEVICE)
    begin = clock.mark()
    for _ in range(20):
        a = a @ a / 64
    end = clock.mark()
    clock.resolve()
    assert clock.seconds(end) > clock.seconds(begin) >= clock.t0


def test_memory_policy_offload_and_recompute_on_cuda_are_bitwise_store_all():
    """Offload through pinned memory on the side stream (prefetched, and fetched on demand)
    and recompute give store-all's gradients bit for bit on CUDA; FP8 payloads are 1 byte;
    every saved byte is released after the backward."""
    from model.init import initialize
    from model.lm import ChunkSpec, LanguageModelChunk
    from model.memory_policy import REPORT_RECOMPUTE, MemoryPolicy, all_regions
    from model.saved_tensors import ActivationMemory

    cfg = preset("tiny")

    def run(policy, prefetch):
        torch.manual_seed(0)
        lm = LanguageModelChunk(cfg.lm, ChunkSpec.whole(cfg.lm)).to(DEVICE)
        initialize(lm, 0)
        memory = None
        if policy is not None:
            memory = ActivationMemory(policy, DEVICE)
            memory.attach(lm)
            memory.start_step()
        g = torch.Generator().manual_seed(1)
        B, S = 2, 128
        tokens = torch.randint(5, cfg.lm.vocab_size, (B, S), generator=g).to(DEVICE)
        positions = torch.arange(S).repeat(B, 1).to(DEVICE)
        docs = (torch.arange(S) // 40).repeat(B, 1).to(DEVICE)
        labels = torch.randint(0, cfg.lm.vocab_size, (B, S), generator=g).to(DEVICE)
        with memory.pass_of("mb0") if memory else torch.enable_grad():
            loss = lm(tokens, positions, docs, None, None, labels)
        if memory is not None and prefetch:
            memory.prefetch("mb0")
        loss.backward()
        torch.cuda.synchronize()
        if memory is not None:
            assert memory.live == {"device": 0, "host": 0}
        return {n: p.grad.cpu() for n, p in lm.named_parameters() if p.grad is not None}

    want = run(None, False)
    for policy in (MemoryPolicy(recompute=REPORT_RECOMPUTE, offload=all_regions()),
                   MemoryPolicy(offload=all_regions())):
        for prefetch in (True, False):
            got = run(policy, prefetch)
            assert all(torch.equal(want[n], got[n]) for n in want), (policy, prefetch)
    report = run(MemoryPolicy.preset("report"), True)
    assert all(torch.isfinite(t).all() for t in report.values())
