"""QK-Clip: a head forced over tau is clipped to tau exactly, nothing else moves.

The statistic is the MLA forward's own (`track_max_logit`); the clip runs inside the
Muon rule of a world-of-one ZeRO-1, after the update. Recomputing the logits after the
step gives tau for the forced head (to fp32 rounding), the other heads' maxima bit for
bit, and the shared rope key (kv_down) and the values' rows of kv_up unchanged. A second
test cuts q_up/kv_up mid-row across three shards: the clip of the pieces equals the
clip of the whole matrices.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from model.config import preset
from model.attention import DocumentMask
from model.mla import MLA
from model.rope import RotaryEmbedding
from parallel.adamw import AdamW
from parallel.bucket_layout import plan_buckets
from parallel.muon import Muon, MuonConfig
from parallel.qk_clip import KV_UP, Q_UP, MLAHeads, QKClip
from parallel.update_rule import BucketShard
from parallel.zero1 import ParamGroup, Zero1Optimizer

FORCED = 1  # the head pushed over tau


def _setup():
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("tiny").lm, heads=4)
    mla = MLA(cfg)
    nope, rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    with torch.no_grad():  # head FORCED's queries 20x larger: logits 20x larger
        mla.q_up.weight[FORCED * (nope + rope):(FORCED + 1) * (nope + rope)] *= 20.0
    B, S = 2, 24
    x = torch.randn(B, S, cfg.hidden)
    positions = torch.arange(S).repeat(B, 1)
    doc_ids = torch.cat([torch.zeros(B, S // 2), torch.ones(B, S - S // 2)], 1).long()
    heads = MLAHeads(cfg.heads, nope, rope, cfg.v_head_dim)
    return cfg, mla, heads, (x, RotaryEmbedding(cfg)(positions), DocumentMask(doc_ids))


def _max_logit(mla: MLA, inputs) -> torch.Tensor:
    mla.track_max_logit = True
    with torch.no_grad():
        mla(*inputs)
    return mla.take_max_logit()


def _optimizer(mla: MLA, clip: QKClip | None) -> Zero1Optimizer:
    named = [(f"attn.{n}", p) for n, p in mla.named_parameters()]
    matrices = [(n, p) for n, p in named if p.dim() == 2]
    rest = [(n, p) for n, p in named if p.dim() != 2]
    return Zero1Optimizer(
        [ParamGroup([p for _, p in matrices], None, [n for n, _ in matrices],
                    rule=Muon(MuonConfig(weight_decay=0.1), clip=clip)),
         ParamGroup([p for _, p in rest], None, [n for n, _ in rest], rule=AdamW())],
        norm_group=None, max_grad_norm=0.0)


def test_forced_head_is_clipped_to_tau_exactly_others_untouched():
    torch.set_num_threads(1)
    cfg, mla, heads, inputs = _setup()
    before = _max_logit(mla, inputs)
    others = [h for h in range(cfg.heads) if h != FORCED]
    tau = float(before[others].max()) * 1.5
    assert before[FORCED] > 2 * tau, before  # the forced head is well over tau
    snapshot = {n: p.detach().clone() for n, p in mla.named_parameters()}
    clip = QKClip(heads, tau=tau)
    zero = _optimizer(mla, clip)
    clip.set_max_logits({"attn": before})
    zero.step(0.0)  # lr 0: the update moves nothing, only the clip acts
    after = _max_logit(mla, inputs)
    torch.testing.assert_close(after[FORCED], torch.tensor(tau), rtol=2e-6, atol=0)
    assert torch.equal(after[others], before[others]), (after, before)
    assert torch.equal(mla.kv_down.weight, snapshot["kv_down.weight"]), "shared rope key moved"
    nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim
    kv = mla.kv_up.weight.detach().view(cfg.heads, nope + v, -1)
    kv0 = snapshot["kv_up.weight"].view(cfg.heads, nope + v, -1)
    assert torch.equal(kv[:, nope:], kv0[:, nope:]), "values rescaled"
    assert torch.equal(kv[others], kv0[others]) and not torch.equal(kv[FORCED], kv0[FORCED])
    for name in ("q_down.weight", "o_proj.weight", "q_norm.weight", "kv_norm.weight"):
        assert torch.equal(dict(mla.named_parameters())[name], snapshot[name]), name


def test_clip_follows_the_update():
    """With a real update, the clipped weights are the unclipped update's, row-scaled."""
    torch.set_num_threads(1)
    results = []
    for clipping in (False, True):
        _, mla, heads, inputs = _setup()
        stat = _max_logit(mla, inputs)
        clip = QKClip(heads, tau=float(stat.min()) * 1.01) if clipping else None
        zero = _optimizer(mla, clip)
        if clip is not None:
            clip.set_max_logits({"attn": stat})
        mla(*inputs).square().mean().backward()
        zero.step(1e-2)
        results.append({n: p.detach().clone() for n, p in mla.named_parameters()})
    plain, clipped = results
    scales = clip.row_scales(stat)
    for name, kind in (("q_up.weight", Q_UP), ("kv_up.weight", KV_UP)):
        torch.testing.assert_close(clipped[name], plain[name] * scales[kind].unsqueeze(1),
                                   rtol=1e-6, atol=0)
    assert not torch.equal(clipped["q_up.weight"], plain["q_up.weight"])
    assert torch.equal(clipped["kv_down.weight"], plain["kv_down.weight"])


def test_pieces_cut_mid_row_are_clipped_like_whole_rows():
    _, _, heads, _ = _setup()
    H, nope, rope, v = heads.heads, heads.qk_nope_head_dim, heads.qk_rope_head_dim, \
        heads.v_head_dim
    shapes = [(H * (nope + rope), 7), (H * (nope + v), 5)]
    names = ["l.attn" + Q_UP, "l.attn" + KV_UP]
    (bucket,) = plan_buckets(shapes, names, [True, True], bucket_numel=10_000, group_size=3)
    assert any(p.param_start % p.slot.shape[1] for r in range(3) for p in bucket.pieces(r)), \
        "no piece starts mid-row"
    weights = [torch.randn(s) for s in shapes]
    flat = torch.zeros(bucket.padded_numel)
    for slot, w in zip(bucket.slots, weights):
        flat[slot.offset:slot.end] = w.reshape(-1)
    clip = QKClip(heads, tau=10.0)
    clip.set_max_logits({"l.attn": torch.tensor([5.0, 40.0, 10.0, 1000.0])})
    for rank in range(3):
        start, end = bucket.shard_range(rank)
        shard = BucketShard(bucket, rank, 3, None, tuple(bucket.pieces(rank)), flat[start:end],
                            {})
        clip.apply_(shard, clip.prepare(shard))
    scales = clip.row_scales(torch.tensor([5.0, 40.0, 10.0, 1000.0]))
    for slot, w, kind in zip(bucket.slots, weights, (Q_UP, KV_UP)):
        expected = w * scales[kind].unsqueeze(1)
        assert torch.equal(flat[slot.offset:slot.end].view(slot.shape), expected), kind
    assert scales[Q_UP].view(H, -1)[1, :nope].eq(0.5).all()  # sqrt(10 / 40)
    assert scales[Q_UP].view(H, -1)[1, nope:].eq(0.25).all()
    assert scales[KV_UP].view(H, -1)[:, nope:].eq(1).all() and scales[Q_UP][:nope].eq(1).all()
