"""QK-Clip (Kimi K2, MuonClip): keep every MLA head's largest attention logit <= tau.

After the optimizer update, for each head h of each MLA layer whose largest
pre-softmax logit of the step, S_max[h] (max over query/key pairs the mask allows, over
the step's microbatches and data-parallel replicas), exceeds tau:

    gamma = tau / S_max[h]
    q_up rows of head h:   [ q_nope (nope rows) | q_rope (rope rows) ]   *= [sqrt(gamma) | gamma]
    kv_up rows of head h:  [ k_nope (nope rows) | v (v_head_dim rows) ]  *= [sqrt(gamma) | 1]
    kv_down's rope key (k_rope): untouched: it is ONE head shared by all heads

so q_nope.k_nope and q_rope.k_rope both scale by gamma and, for the same inputs, the
head's largest logit becomes exactly tau; values and other heads are untouched.

On ZeRO-1 shards: q_up [H*(nope+rope), q_lora] and kv_up [H*(nope+v), kv_lora] are
row-major, so a head's rows are contiguous; each rank scales the elements of those rows
that lie in its master shard (`prepare` finds the pieces once; a piece cut by a shard
boundary mid-row gets the right per-row factors). No communication here: every rank of the
group already holds the same S_max, MAX-reduced before the step together with the router
loads in the step's one statistics collective (parallel/step_statistics.py). The
statistic comes from model/mla.py (`MLA.track_max_logit`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from model.mla import MLA
from parallel.update_rule import BucketShard

Q_UP, KV_UP = ".q_up.weight", ".kv_up.weight"


@dataclass(frozen=True)
class MLAHeads:
    """The head geometry of the MLA layers QK-Clip rescales."""

    heads: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class _Rows:
    """A piece of q_up or kv_up in this shard."""

    attention: str  # module name, e.g. "lm.layers.3.attn"
    kind: str  # Q_UP or KV_UP
    shard_start: int
    param_start: int  # flat index into the parameter
    numel: int
    cols: int


class QKClip:
    """Per-head rescaling of q_up/kv_up rows after the update (see the module docstring)."""

    def __init__(self, heads: MLAHeads, tau: float = 100.0):
        if tau <= 0:
            raise ValueError(f"QK-Clip tau must be > 0, got {tau}")
        self.geometry = heads
        self.tau = float(tau)
        self.max_logits: dict[str, torch.Tensor] = {}  # attention module -> [H], this step

    def set_max_logits(self, by_attention: dict[str, torch.Tensor]) -> None:
        """The step's reduced per-head maxima (same values on every rank), before `step`."""
        self.max_logits = dict(by_attention)

    def row_scales(self, max_logit_H: torch.Tensor) -> dict[str, torch.Tensor]:
        """{Q_UP: [H*(nope+rope)], KV_UP: [H*(nope+v)]} per-row factors (1 where S <= tau)."""
        g = self.geometry
        gamma_H = torch.where(max_logit_H > self.tau, self.tau / max_logit_H,
                              torch.ones_like(max_logit_H)).float()
        root_H1 = gamma_H.sqrt().unsqueeze(1)
        q = torch.cat([root_H1.expand(g.heads, g.qk_nope_head_dim),
                       gamma_H.unsqueeze(1).expand(g.heads, g.qk_rope_head_dim)], dim=1)
        kv = torch.cat([root_H1.expand(g.heads, g.qk_nope_head_dim),
                        torch.ones(g.heads, g.v_head_dim, device=gamma_H.device)], dim=1)
        return {Q_UP: q.reshape(-1), KV_UP: kv.reshape(-1)}

    def prepare(self, shard: BucketShard) -> list[_Rows]:
        rows = []
        for piece in shard.pieces:
            name = piece.slot.name
            kind = Q_UP if name.endswith(Q_UP) else KV_UP if name.endswith(KV_UP) else None
            if kind is None:
                continue
            rows.append(_Rows(name[:-len(kind)], kind, piece.shard_start, piece.param_start,
                              piece.numel, piece.slot.shape[-1]))
        return rows

    @torch.no_grad()
    def apply_(self, shard: BucketShard, plan: list[_Rows]) -> None:
        """Scale the rows of over-tau heads in ``shard.master`` (after the update)."""
        for piece in plan:
            max_logit_H = self.max_logits.get(piece.attention)
            if max_logit_H is None:
                raise RuntimeError(f"QK-Clip has no max logit for {piece.attention!r} this step: "
                                   f"call QKClip.set_max_logits (with MLA.track_max_logit on) "
                                   f"before the optimizer step")
            if not bool((max_logit_H > self.tau).any()):
                continue
            scale_R = self.row_scales(max_logit_H.to(shard.master.device))[piece.kind]
            first = piece.param_start // piece.cols
            last = (piece.param_start + piece.numel - 1) // piece.cols
            offset = piece.param_start - first * piece.cols
            scale = scale_R[first:last + 1].repeat_interleave(piece.cols)
            shard.master[piece.shard_start:piece.shard_start + piece.numel].mul_(
                scale[offset:offset + piece.numel])


def track_max_logits(modules: Iterable[nn.Module]) -> dict[str, MLA]:
    """Turn on the statistic in every MLA inside ``modules`` (roots whose parameter names
    are the global ones); returns them by name (e.g. ``lm.layers.3.attn``)."""
    found = {}
    for module in modules:
        for name, sub in module.named_modules():
            if isinstance(sub, MLA):
                sub.track_max_logit = True
                found[name] = sub
    return found
