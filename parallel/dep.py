"""Decoupled Encoder Process (Kimi K2.5 report, 4.5.1): the vision encoder outside the pipeline.

One step, on every rank of the job (the encoder is replicated everywhere):

    1 plan        every rank: same LPT assignment of the step's media to all ranks (of the
                  DEP group), built from locally derived metadata, digest compared over the
                  group before any other DEP collective
    2 forward     fetch and decode MY items (only those), encode them under no_grad
                  (ViT + projector), keep only the output rows
                  ──all_to_all──> stage-0 rank of the replica that owns each item
    3 backbone    stage 0 puts the rows, as leaves that require grad, at the placeholders;
                  the pipeline schedule runs unchanged, except for one action R per rank:
                  recompute MY items' encoder forward WITH grad, in a bubble of the
                  schedule where the rank would wait anyway (parallel/dep_bubbles.py)
    4 backward    leaf grads ──all_to_all (reverse route)──> encoder ranks;
                  backward those grads through the recomputed forward
    5 optimizer   encoder grads summed over the world (ZeRO-1 group = world)

    rank:        0        1        2        3             (pp=2, dp=2: ranks 0,1 are stage 0)
    encode:    [a  d]   [b]      [c  e]   [f]             balanced by patch count
    owners:     0: a b c            1: d e f              rows travel to stage 0 of their replica
    backbone:  ------------- interleaved 1F1B, + R in a cool-down wait -
    grads:      a b c -> 0,1,2      d e f -> 0,2,3        reverse route, then backward (R ran earlier)

Stage 0 keeps only the embeddings it receives; no encoder activation lives through
the backbone schedule's warm-up and steady state (the recompute's live from its bubble in
the cool-down to the end of the step), so the pipeline's peak does not depend on image
sizes.

Where pixels come from: nowhere but this rank's own loader. Every rank derives the
metadata of the group's step locally (its loader plans the group's rows from the
dataset index: item ids, grids, owners; no gather), so the digest check compares plans
built independently and catches a rank whose data diverged. Each rank then fetches
and decodes exactly the items the plan gives it (`StepMedia.fetch`, a callback of the
trainer into the loader), and keeps their pixels for the recomputation. No pixels
travel between ranks; only embeddings and their gradients do.

The ranks that share one plan are a DEP group (parallel/topology.py): by default every
rank of the job; with more DP replicas than `parallel.dep_group_replicas`, runs of that
many replicas, so the metadata and planning work per rank stays bounded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from model.vision_language import VisionEncoder
from parallel.dep_plan import DepPlan, ExchangeSplits, MediaRef, plan_media, send_recv_splits, verify_same_plan
from parallel.expert_dispatch import all_to_all

Grid = tuple[int, int, int]


@dataclass
class StepMedia:
    """One step's media as this rank derived it (nothing gathered from other ranks)."""

    refs: list[MediaRef]  # every item of the DEP group's step; replica = index within the group
    grids: dict[int, Grid]  # item_id -> (t, h, w)
    # the model-ready patches [t*h*w, patch_dim] of the given items (those this rank encodes)
    fetch: Callable[[list[MediaRef]], list[torch.Tensor]]
    rows_digest: str = ""  # digest of the group's planned rows: compared together with the plan


class DecoupledEncoder:
    def __init__(self, encoder: VisionEncoder, group, stage0_rank_of_replica: list[int]):
        """`group`: the DEP group; `stage0_rank_of_replica[r]`: rank in `group` of pipeline
        stage 0 of the group's r-th replica."""
        self.encoder = encoder
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.stage0_rank_of_replica = stage0_rank_of_replica
        self.plan: DepPlan | None = None
        self._mine: list[MediaRef] = []
        self._exchange: ExchangeSplits | None = None  # who sends which rows to whom, in order
        self._grids: dict[int, Grid] = {}
        self._patches: dict[int, torch.Tensor] = {}  # pixels of the items this rank encodes
        self._leaves: dict[int, torch.Tensor] = {}
        self._rows: torch.Tensor | None = None  # the recomputed forward, with its graph
        # last step: what this rank encoded (items, patch rows actually fed to the encoder)
        # and sent; the engine reports it, tests check it against the plan
        self.stats: dict[str, float] = {}

    @property
    def _device(self) -> torch.device:
        return self.encoder.projector.fc2.weight.device

    def _encode(self) -> torch.Tensor:
        if not self._mine:  # the compute dtype: every rank's all_to_all buffers must agree
            fc2 = self.encoder.projector.fc2
            return fc2.weight.new_zeros(0, fc2.out_features)
        patches = torch.cat([self._patches[m.item_id] for m in self._mine])
        return self.encoder(patches, [self._grids[m.item_id] for m in self._mine])

    def forward(self, media: StepMedia) -> dict[int, torch.Tensor]:
        """Steps 1-2: returns {item_id: leaf embeddings [tokens, D]} for the items this rank owns."""
        plan = plan_media(media.refs, self.world, self.stage0_rank_of_replica)
        verify_same_plan(plan, self.group, rows_digest=media.rows_digest)
        self.plan = plan
        self._mine = plan.items_encoded_by(self.rank)
        self._exchange = ex = send_recv_splits(plan, self.rank, self.world)
        self._grids = media.grids
        patches = media.fetch(self._mine)
        if len(patches) != len(self._mine):
            raise RuntimeError(f"DEP asked for {len(self._mine)} media items and got {len(patches)}")
        self._patches = {m.item_id: p.to(self._device) for m, p in zip(self._mine, patches)}
        with torch.no_grad():
            rows = self._encode()
        by_item = dict(zip([m.item_id for m in self._mine],
                           rows.split([m.num_tokens for m in self._mine])))
        send_rows = [by_item[m.item_id] for items in ex.send for m in items]
        send = torch.cat(send_rows) if send_rows else rows.new_zeros(0, rows.shape[1])
        received = all_to_all(send, ex.send_rows, ex.recv_rows, self.group)
        items = [m for per_src in ex.recv for m in per_src]
        self._leaves = {m.item_id: r.detach().clone().requires_grad_() for m, r in
                        zip(items, received.split([m.num_tokens for m in items]))}
        remote = sum(n for dst, n in enumerate(ex.send_rows) if dst != self.rank)
        self.stats = {"dep_items_encoded": float(len(self._mine)),
                      "dep_patches_encoded": float(sum(p.shape[0] for p in patches)),
                      # to other ranks, forward (the gradients come back the same size)
                      "dep_embedding_bytes_sent": float(remote * send.shape[1] * send.element_size())}
        return self._leaves

    def recompute(self) -> None:
        """Step 3's R: this rank's encoder forward again, with grad (same inputs and weights
        as the no-grad forward, so the same numbers); `backward` back-propagates it."""
        self._rows = self._encode()

    def backward(self) -> None:
        """Step 4: send the leaves' grads back, back-propagate them through the recompute."""
        ex = self._exchange
        items = [m for per_src in ex.recv for m in per_src]
        grads = [self._leaves[m.item_id].grad for m in items]
        weight = self.encoder.projector.fc2.weight  # its dtype is the embeddings' dtype
        grads = [weight.new_zeros(m.num_tokens, weight.shape[0]) if g is None else g
                 for m, g in zip(items, grads)]
        back = torch.cat(grads) if grads else weight.new_zeros(0, weight.shape[0])
        returned = all_to_all(back, ex.recv_rows, ex.send_rows, self.group)
        sent_items = [m for per_dst in ex.send for m in per_dst]
        grad_by_item = dict(zip([m.item_id for m in sent_items],
                                returned.split([m.num_tokens for m in sent_items])))
        # a schedule without R (benchmarks/dep.py's "after" variant) recomputes here
        rows = self._rows if self._rows is not None else self._encode()
        self._rows = None
        if self._mine:
            rows.backward(torch.cat([grad_by_item[m.item_id] for m in self._mine]))
        self._leaves, self._patches = {}, {}
