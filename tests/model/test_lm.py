"""Language model: packing exactness, MLA against a naive reference, router and balancing."""
import dataclasses
import math

import pytest
import torch

from model.config import LMConfig, preset
from model.dispatcher import LocalDispatcher
from model.init import initialize
from model.lm import LanguageModelChunk
from model.attention import DocumentMask, packed_causal_mask
from model.mla import MLA
from model.rope import RotaryEmbedding
from model.moe import MoE, Router
from model.param_names import global_named_tensors

torch.set_num_threads(1)


def tiny_lm(**changes) -> LMConfig:
    return dataclasses.replace(preset("tiny").lm, **changes)


def built(module, seed=0):
    initialize(module, seed)
    return module


def test_packed_documents_equal_each_alone():
    cfg = tiny_lm()
    lm = built(LanguageModelChunk(cfg))
    gen = torch.Generator().manual_seed(1)
    lengths = [7, 12, 5]
    docs = [torch.randint(4, cfg.vocab_size, (n,), generator=gen) for n in lengths]
    tokens = torch.cat(docs + [torch.zeros(4, dtype=torch.long)]).unsqueeze(0)  # + padding
    positions = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(4, dtype=torch.long)])
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]
                        + [torch.full((4,), -1)])
    packed = lm(tokens, positions.unsqueeze(0), doc_ids.unsqueeze(0))[0]
    assert torch.isfinite(packed).all()
    start = 0
    for doc in docs:
        n = len(doc)
        alone = lm(doc.unsqueeze(0), torch.arange(n).unsqueeze(0),
                   torch.zeros(1, n, dtype=torch.long))[0]
        torch.testing.assert_close(packed[start:start + n], alone, atol=2e-5, rtol=1e-5)
        start += n
    # the check has teeth: without the document mask, later documents see earlier ones
    unmasked = lm(tokens, positions.unsqueeze(0), torch.zeros_like(doc_ids).unsqueeze(0))[0]
    assert (unmasked[lengths[0]:sum(lengths)] - packed[lengths[0]:sum(lengths)]).abs().max() > 1e-3


def test_packed_causal_mask_shape_and_rules():
    doc = torch.tensor([[0, 0, 1, 1, -1]])
    m = packed_causal_mask(doc)[0, 0]
    assert m.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [False, False, True, False, False],
        [False, False, True, True, False],
        [False, False, False, False, True]]


def _rms(v, weight, eps):
    return v / torch.sqrt(v.pow(2).mean() + eps) * weight


# Rotary numbers of the small MLA config below, derived by hand from DeepSeek-V3's published
# formulas, NOT from model/rope.py (so a wrong formula there cannot agree with itself):
#   DeepSeek-V3 inference/model.py `precompute_freqs_cis` (find_correction_dim,
#   find_correction_range, linear_ramp_factor) and the Hugging Face DeepSeek-V3 modeling code
#   (`yarn_get_mscale`, DeepseekV3YarnRotaryEmbedding's cos/sin `_mscale`, the attention's
#   `softmax_scale * mscale**2` with mscale = yarn_get_mscale(factor, mscale_all_dim)).
#
# Config: rope dim d = 8, base = 50000, YaRN factor s = 8 over L = 4096 original positions,
# beta_fast = 32, beta_slow = 1, mscale = 1.0, mscale_all_dim = 0.8, qk head dim 6 + 8 = 14.
#
#   freq_i = base ** (-2i / d), i = 0..3
#          = 1, 50000**-0.25, 50000**-0.5, 50000**-0.75
#          = 1, 0.0668740304976422, 0.00447213595499958, 0.0002990697562442441
#   correction dim(r) = d * ln(L / (2 pi r)) / (2 ln base)
#          dim(32) = 8 * ln(20.372) / 21.640 = 1.1143  -> low  = max(floor(1.1143), 0)  = 1
#          dim(1)  = 8 * ln(651.90) / 21.640 = 2.3956  -> high = min(ceil(2.3956), d-1) = 3
#   ramp_i = clamp((i - low) / (high - low), 0, 1)      = 0, 0, 0.5, 1
#   inv_freq_i = freq_i / s * ramp_i + freq_i * (1 - ramp_i)
#          = 1, 0.0668740304976422, 0.00447213595499958 * (0.5/8 + 0.5), 0.0002990697562442441 / 8
#          = 1, 0.0668740304976422, 0.0025155764746872637, 3.738371953053051e-05
#   yarn_get_mscale(s, m) = 0.1 * m * ln(s) + 1   (1 when s <= 1); ln 8 = 2.0794415416798357
#          yarn_get_mscale(8, 1.0) = 1.2079441541679836
#          yarn_get_mscale(8, 0.8) = 1.1663553233343869
#   cos/sin scale = 1.2079441541679836 / 1.1663553233343869 = 1.0356570849393496
#   softmax scale = 14 ** -0.5 * 1.1663553233343869 ** 2 = 0.3635781151633946
# Without YaRN: inv_freq = freq, cos/sin scale 1, softmax scale 14 ** -0.5 = 0.2672612419124244.
ROPE_NUMBERS = {
    0.0: dict(inv_freq=[1.0, 0.0668740304976422, 0.00447213595499958, 0.0002990697562442441],
              cos_sin_scale=1.0, attention_mscale=1.0, softmax_scale=0.2672612419124244),
    8.0: dict(inv_freq=[1.0, 0.0668740304976422, 0.0025155764746872637, 3.738371953053051e-05],
              cos_sin_scale=1.0356570849393496, attention_mscale=1.1663553233343869,
              softmax_scale=0.3635781151633946),
}


def reference_mla(mla: MLA, x_BSD, position_ids_BS, doc_ids_BS, rope_numbers: dict):
    """The MLA equations written out token by token and head by head, from the weights and
    the hand-derived rotary numbers only."""
    cfg = mla.cfg
    B, S, _ = x_BSD.shape
    H, nope, rope, vdim = cfg.heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    inv_freq, scale = rope_numbers["inv_freq"], rope_numbers["cos_sin_scale"]

    def rotate(vec, pos):  # pairs (i, i + rope/2), the 'rotate half' layout
        half = rope // 2
        out = vec.clone()
        for i in range(half):
            c, s = math.cos(pos * inv_freq[i]) * scale, math.sin(pos * inv_freq[i]) * scale
            a, b = vec[i], vec[i + half]
            out[i], out[i + half] = a * c - b * s, b * c + a * s
        return out

    out = torch.zeros(B, S, cfg.hidden)
    for b in range(B):
        qs, ks, vs = [], [], []
        for s in range(S):
            x, pos = x_BSD[b, s], int(position_ids_BS[b, s])
            q = mla.q_up.weight @ _rms(mla.q_down.weight @ x, mla.q_norm.weight, cfg.latent_norm_eps)
            kv = mla.kv_down.weight @ x
            c_kv, k_r = kv[:cfg.kv_lora_rank], rotate(kv[cfg.kv_lora_rank:], pos)
            kv_up = mla.kv_up.weight @ _rms(c_kv, mla.kv_norm.weight, cfg.latent_norm_eps)
            q_h, k_h, v_h = [], [], []
            for h in range(H):
                qh = q[h * (nope + rope):(h + 1) * (nope + rope)]
                q_h.append(torch.cat([qh[:nope], rotate(qh[nope:], pos)]))
                kvh = kv_up[h * (nope + vdim):(h + 1) * (nope + vdim)]
                k_h.append(torch.cat([kvh[:nope], k_r]))
                v_h.append(kvh[nope:])
            qs.append(q_h), ks.append(k_h), vs.append(v_h)
        for s in range(S):
            allowed = [j for j in range(s + 1) if doc_ids_BS[b, j] == doc_ids_BS[b, s]]
            heads = []
            for h in range(H):
                scores = torch.stack([qs[s][h] @ ks[j][h] for j in allowed]) \
                    * rope_numbers["softmax_scale"]
                weights = torch.softmax(scores, dim=0)
                heads.append(sum(w * vs[j][h] for w, j in zip(weights, allowed)))
            out[b, s] = mla.o_proj.weight @ torch.cat(heads)
    return out


@pytest.mark.parametrize("yarn_factor", [0.0, 8.0])
def test_mla_matches_reference(yarn_factor):
    cfg = tiny_lm(hidden=32, heads=2, q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=6,
                  qk_rope_head_dim=8, v_head_dim=5, rope_theta=50000.0, yarn_factor=yarn_factor,
                  yarn_original_max_position=4096, yarn_beta_fast=32.0, yarn_beta_slow=1.0,
                  yarn_mscale=1.0, yarn_mscale_all_dim=0.8)
    numbers = ROPE_NUMBERS[yarn_factor]
    mla = MLA(cfg)
    # weights ~ N(0, 0.3), not the training init's 0.02: at 0.02 the scores are ~0.03, the
    # softmax is nearly uniform and the output hardly depends on q.k, so a wrong rotation or
    # scale would pass; at 0.3 the scores are O(1) and the attention is peaked
    initialize(mla, seed=0, std=0.3)
    rotary = RotaryEmbedding(cfg)  # the chunk's, computed once per forward for every layer
    # the modules' own numbers against the hand derivation (float32 buffer: 1 ulp ~ 6e-8)
    torch.testing.assert_close(rotary.inv_freq, torch.tensor(numbers["inv_freq"]),
                               rtol=1e-7, atol=0)
    assert rotary.cos_sin_scale == pytest.approx(numbers["cos_sin_scale"], rel=1e-12)
    assert rotary.attention_mscale == pytest.approx(numbers["attention_mscale"], rel=1e-12)
    assert mla.softmax_scale == pytest.approx(numbers["softmax_scale"], rel=1e-12)
    with torch.no_grad():  # non-trivial norm scales, so the reference must apply them
        mla.q_norm.weight.uniform_(0.5, 1.5)
        mla.kv_norm.weight.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, cfg.hidden, generator=gen)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [5, 6, 7, 8, 9, 10]])
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    got = mla(x, rotary(positions), DocumentMask(doc_ids))
    want = reference_mla(mla, x, positions, doc_ids, numbers)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_router_weights_normalised_scaled_and_bias_gets_no_gradient():
    cfg = tiny_lm()
    router = built(Router(cfg))
    router.bias.copy_(torch.linspace(-0.3, 0.3, cfg.num_experts))
    x = torch.randn(10, cfg.hidden, requires_grad=True)
    idx, weights = router.route(x)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(-1), torch.full((10,), cfg.routed_scaling_factor))
    scores = torch.sigmoid(x.detach() @ router.weight.detach().t())
    want_idx = torch.topk(scores + router.bias, cfg.top_k, dim=-1).indices
    assert torch.equal(idx, want_idx)
    # the weights come from the raw scores, not from scores + bias
    want_w = scores.gather(1, idx)
    torch.testing.assert_close(weights.detach(),
                               want_w / want_w.sum(-1, keepdim=True) * cfg.routed_scaling_factor)
    weights.sum().backward()
    assert router.weight.grad is not None and not router.bias.requires_grad
    assert "bias" in dict(router.named_buffers()) and "bias" not in dict(router.named_parameters())


def naive_moe(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """The MoE equation token by token, expert by expert, from the per-expert weight views."""
    views = global_named_tensors(moe.experts, "e")
    idx, w = moe.router.route(x_TD)
    want = []
    for t, token in enumerate(x_TD):
        out = moe.shared(token)
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            gate, up, down = (views[f"e.{e}.{p}.weight"] for p in ("gate", "up", "down"))
            out = out + w[t, k] * (down @ (torch.nn.functional.silu(gate @ token) * (up @ token)))
        want.append(out)
    return torch.stack(want)


@pytest.mark.parametrize("tokens, starve", [(10, None), (1, None), (7, [0, 3, 5])])
def test_grouped_moe_equals_per_token_sum_of_experts(tokens, starve):
    """Grouped GEMM + scatter-add combine against the naive sum, values and every gradient;
    with one token, and with experts that receive no token at all."""
    cfg = tiny_lm()
    moe = built(MoE(cfg))
    assert isinstance(moe.dispatcher, LocalDispatcher)
    if starve:
        moe.router.bias[starve] = -100.0  # never chosen
    x = torch.randn(1, tokens, cfg.hidden, generator=torch.Generator().manual_seed(tokens))
    y = moe(x)
    assert moe.expert_load.sum() == tokens * cfg.top_k
    if starve:
        assert moe.expert_load[starve].sum() == 0
    upstream = torch.randn_like(y)
    y.backward(upstream)
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad()
    want = naive_moe(moe, x.view(-1, cfg.hidden))
    torch.testing.assert_close(y.view(-1, cfg.hidden), want, atol=1e-6, rtol=1e-5)
    want.backward(upstream.view(-1, cfg.hidden))
    for name, p in moe.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    if starve:
        assert grads["experts.gate"][starve].abs().max() == 0


def test_balancing_bias_moves_load_toward_underused_experts():
    cfg = tiny_lm(bias_update_rate=0.02)
    moe = built(MoE(cfg))
    x = torch.randn(1, 256, cfg.hidden, generator=torch.Generator().manual_seed(0))
    x_dir = x.mean(dim=(0, 1))
    with torch.no_grad():  # a router that strongly prefers the first experts
        moe.router.weight[:4] += x_dir / x_dir.norm()

    def imbalance():
        moe.expert_load.zero_()
        with torch.no_grad():
            moe(x)
        load = moe.expert_load.clone()
        return (load.max() / load.mean()).item(), load

    first, _ = imbalance()
    for _ in range(60):
        _, load = imbalance()
        moe.update_bias(load)
    last, _ = imbalance()
    assert first > 2.0 and last < 0.6 * first
    assert moe.router.bias[:4].max() < 0 < moe.router.bias[4:].max()
