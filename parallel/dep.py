"""Decoupled Encoder Process (Kimi K2.5 report, 4.5.1): the vision encoder outside the pipeline.

One step, on every rank of the job (the encoder is replicated everywhere):

    1 plan        every rank: same LPT assignment of the global batch's media to all ranks,
                  digest compared over the world before any other DEP collective
    2 forward     encode MY items under no_grad (ViT + projector), keep only the output rows
                  ──all_to_all──> stage-0 rank of the replica that owns each item
    3 backbone    stage 0 puts the rows, as leaves that require grad, at the placeholders;
                  the pipeline schedule runs unchanged
    4 backward    leaf grads ──all_to_all (reverse route)──> encoder ranks;
                  recompute MY items' encoder forward WITH grad, backward those grads
    5 optimizer   encoder grads summed over the world (ZeRO-1 group = world)

    rank:        0        1        2        3             (pp=2, dp=2: ranks 0,1 are stage 0)
    encode:    [a  d]   [b]      [c  e]   [f]             balanced by patch count
    owners:     0: a b c            1: d e f              rows travel to stage 0 of their replica
    backbone:  ------------- interleaved 1F1B, unchanged -------------
    grads:      a b c -> 0,1,2      d e f -> 0,2,3        reverse route, then recompute + backward

Stage 0 keeps only the embeddings it receives; no encoder activation lives through
the backbone schedule, so its memory no longer depends on image sizes.

Where pixels come from: each replica's loader decodes its own media; step 1 gathers
only their metadata (shapes, owners) from the stage-0 ranks, and the pixels of each
item travel once from its owner to its encoder rank (an all_to_all of patch rows)
before the balanced forward. The encoder rank keeps them for the recomputation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.vision_language import VisionEncoder
from parallel.dep_plan import (DepPlan, ExchangeSplits, MediaRef, plan_media, send_recv_splits,
                               verify_same_plan)
from parallel.expert_dispatch import all_to_all

Grid = tuple[int, int, int]


@dataclass
class ReplicaMedia:
    """The media of this rank's data-parallel replica for one step, as its loader made them."""

    refs: list[MediaRef]  # item ids unique in the global batch; replica, microbatch, sizes
    grids: dict[int, Grid]  # item_id -> (t, h, w)
    patches: dict[int, torch.Tensor]  # item_id -> [t*h*w, patch_dim] pixels


class DecoupledEncoder:
    def __init__(self, encoder: VisionEncoder, world_group, stage0_rank_of_replica: list[int]):
        self.encoder = encoder
        self.device = next(encoder.parameters()).device
        self.group = world_group
        self.rank = dist.get_rank(world_group)
        self.world = dist.get_world_size(world_group)
        self.stage0_rank_of_replica = stage0_rank_of_replica
        self.plan: DepPlan | None = None
        self._mine: list[MediaRef] = []
        self._exchange: ExchangeSplits | None = None  # who sends which rows to whom, in order
        self._grids: dict[int, Grid] = {}
        self._patches: dict[int, torch.Tensor] = {}  # pixels of the items this rank encodes
        self._leaves: dict[int, torch.Tensor] = {}

    def _gather_metadata(self, media: ReplicaMedia, is_owner: bool
                         ) -> tuple[list[MediaRef], dict[int, Grid]]:
        """Every replica's media metadata (sent by its stage-0 rank), on every rank."""
        mine = (media.refs, media.grids) if is_owner else ([], {})
        everyone = [None] * self.world
        dist.all_gather_object(everyone, mine, group=self.group)
        refs = [ref for rank_refs, _ in everyone for ref in rank_refs]
        grids = {item: grid for _, rank_grids in everyone for item, grid in rank_grids.items()}
        return refs, grids

    def _move_pixels(self, media: ReplicaMedia) -> dict[int, torch.Tensor]:
        """Owners send each item's patches to its encoder rank; returns the patches I encode."""
        ex = self._exchange
        patch_dim = self.encoder.vit.patch_embed.in_features
        rows = [media.patches[m.item_id] for per_encoder in ex.recv for m in per_encoder]
        send = (torch.cat(rows).to(self.device) if rows
                else torch.zeros(0, patch_dim, device=self.device))
        received = all_to_all(send, [sum(m.num_patches for m in items) for items in ex.recv],
                              [sum(m.num_patches for m in items) for items in ex.send], self.group)
        items = [m for per_owner in ex.send for m in per_owner]
        return dict(zip([m.item_id for m in items],
                        received.split([m.num_patches for m in items])))

    def _encode(self) -> torch.Tensor:
        if not self._mine:
            return torch.zeros(0, self.encoder.projector.fc2.out_features, device=self.device)
        patches = torch.cat([self._patches[m.item_id] for m in self._mine])
        return self.encoder(patches, [self._grids[m.item_id] for m in self._mine])

    def forward(self, media: ReplicaMedia, is_owner: bool) -> dict[int, torch.Tensor]:
        """Steps 1-2: returns {item_id: leaf embeddings [tokens, D]} for the items this rank owns.

        `is_owner`: this rank is pipeline stage 0 of its replica (it sends its replica's
        media metadata and pixels, and receives the embeddings)."""
        refs, self._grids = self._gather_metadata(media, is_owner)
        plan = plan_media(refs, self.world, self.stage0_rank_of_replica)
        verify_same_plan(plan, self.group)
        self.plan = plan
        self._mine = plan.items_encoded_by(self.rank)
        self._exchange = ex = send_recv_splits(plan, self.rank, self.world)
        self._patches = self._move_pixels(media)
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
        return self._leaves

    def backward(self) -> None:
        """Step 4: send the leaves' grads back, recompute with grad, back-propagate."""
        ex = self._exchange
        items = [m for per_src in ex.recv for m in per_src]
        grads = [self._leaves[m.item_id].grad for m in items]
        hidden = self.encoder.projector.fc2.out_features
        grads = [torch.zeros(m.num_tokens, hidden, device=self.device) if g is None else g
                 for m, g in zip(items, grads)]
        back = torch.cat(grads) if grads else torch.zeros(0, hidden, device=self.device)
        returned = all_to_all(back, ex.recv_rows, ex.send_rows, self.group)
        sent_items = [m for per_dst in ex.send for m in per_dst]
        grad_by_item = dict(zip([m.item_id for m in sent_items],
                                returned.split([m.num_tokens for m in sent_items])))
        rows = self._encode()
        if self._mine:
            rows.backward(torch.cat([grad_by_item[m.item_id] for m in self._mine]))
        self._leaves, self._patches = {}, {}
