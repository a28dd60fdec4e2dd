"""The DEP plan: which rank encodes which media item of a step, computed from metadata alone.

With the Decoupled Encoder Process the vision encoder is replicated on every rank
and runs outside the pipeline. Before a step, every rank of the job looks at the
metadata of the *global* batch (all DP replicas, all microbatches: item ids,
patch grids, no pixels) and computes the same `DepPlan`:

    items of the global batch        LPT order      ranks of the job (pp=2 dp=2)
    id  replica  mb  patches         (cost desc)    encodes         load   owns (stage 0)
     0     0      0     64            5  4096       rank 0: 5       4096   items of replica 0
     1     0      1    256            3  1024       rank 1: 3       1024   items of replica 1
     2     1      0     16    ───>    1   256  ───> rank 2: 1        256   -
     3     1      0   1024            0    64       rank 3: 0 2       80   -
     5     1      1   4096            2    16

    each item goes to the least-loaded rank so far (lowest rank on ties);
    its embeddings then travel to the owner: stage 0 of the item's replica.

The assignment is integer LPT (longest processing time first): items sorted by
(cost descending, item id ascending), each placed on the rank with the least
load so far, ties going to the lowest rank id. It is a pure function of the
*set* of items, so input order (which differs with rank order or loader
workers) cannot change it, and every step is reproducible. LPT keeps the
largest load within one item of the optimum and within (4/3 - 1/(3m)) of it.

Every rank must derive the same plan, or the all-to-all that moves embeddings
would wait for rows that never come. `verify_same_plan` compares a digest of
the plan across ranks before any other DEP collective and raises
`DepPlanMismatch` (on every rank) instead of hanging.

`send_recv_splits` turns the plan into the shape of that all-to-all for one
rank: the items it sends to each owner and receives from each encoder, each
list ordered by item id, so both sides agree on where every row goes.
"""
from __future__ import annotations

import hashlib
import heapq
import operator
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

_DIGEST_TAG = b"dep-plan-v1"
_DIGEST_WORDS = 4  # sha256 = 32 bytes = 4 int64 words on the wire


@dataclass(frozen=True)
class MediaRef:
    """Metadata of one media item (image or chunk of up to 4 frames) of the global batch."""

    item_id: int  # unique in the global batch; the plan sorts and breaks ties on it
    replica: int  # DP replica that owns the sequence holding the item
    microbatch: int  # microbatch index within that replica
    num_patches: int  # t*h*w patches the encoder sees
    num_tokens: int  # (h//2)*(w//2) LM embeddings it becomes: the rows the exchange moves

    @classmethod
    def of(cls, item, replica: int, microbatch: int) -> "MediaRef":
        """From anything with `item_id`, `num_patches`, `num_tokens` (the loader's MediaItem)."""
        return cls(int(item.item_id), replica, microbatch, int(item.num_patches),
                   int(item.num_tokens))


def cost_patches(ref: MediaRef) -> int:
    """Default cost model: encoder work grows with the patch count."""
    return ref.num_patches


@dataclass(frozen=True)
class DepPlan:
    """Who encodes and who owns every media item of one step; identical on every rank."""

    items: tuple[MediaRef, ...]  # sorted by item_id
    encoder_rank: tuple[int, ...]  # per item: global rank that encodes it
    owner_rank: tuple[int, ...]  # per item: global rank of pipeline stage 0 of its replica
    costs: tuple[int, ...]  # per item: the cost the balancing used (covered by the digest)

    def load_per_rank(self, world: int) -> list[int]:
        """Summed cost of the items each rank encodes."""
        load = [0] * world
        for rank, cost in zip(self.encoder_rank, self.costs):
            load[rank] += cost
        return load

    def items_encoded_by(self, rank: int) -> list[MediaRef]:
        return [ref for ref, r in zip(self.items, self.encoder_rank) if r == rank]

    def items_owned_by(self, rank: int) -> list[MediaRef]:
        return [ref for ref, r in zip(self.items, self.owner_rank) if r == rank]

    def digest(self) -> str:
        """sha256 hex of a canonical little-endian int64 encoding of the whole plan."""
        words = [len(self.items)]
        for ref, enc, own, cost in zip(self.items, self.encoder_rank, self.owner_rank, self.costs):
            words += [ref.item_id, ref.replica, ref.microbatch, ref.num_patches, ref.num_tokens,
                      cost, enc, own]
        return hashlib.sha256(_DIGEST_TAG + struct.pack(f"<{len(words)}q", *words)).hexdigest()


def _owner_table(stage0_rank_of_replica: Callable[[int], int] | Sequence[int],
                 replicas: Iterable[int], world: int) -> dict[int, int]:
    owners = {}
    for replica in sorted(set(replicas)):
        if callable(stage0_rank_of_replica):
            owner = stage0_rank_of_replica(replica)
        else:
            if not 0 <= replica < len(stage0_rank_of_replica):
                raise ValueError(
                    f"media of DP replica {replica} but stage0_rank_of_replica lists only "
                    f"{len(stage0_rank_of_replica)} replicas: pass one stage-0 rank per DP replica")
            owner = stage0_rank_of_replica[replica]
        if not 0 <= owner < world:
            raise ValueError(f"stage-0 rank {owner} of DP replica {replica} is outside the "
                             f"job's ranks [0, {world})")
        owners[replica] = owner
    return owners


def _checked_cost(cost: Callable[[MediaRef], int], ref: MediaRef) -> int:
    value = cost(ref)
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"cost({ref}) returned {value!r}: the DEP planner balances integer "
                        "costs so every rank sums them exactly; scale and round a calibrated "
                        "cost to an int") from None
    if value < 0:
        raise ValueError(f"cost({ref}) returned {value}: costs must be >= 0")
    return value


def _check_ref(ref: MediaRef) -> None:
    if not isinstance(ref, MediaRef):
        raise TypeError(f"plan_media takes MediaRef items, got {type(ref).__name__}")
    if ref.replica < 0 or ref.microbatch < 0:
        raise ValueError(f"media item {ref.item_id}: replica {ref.replica} and microbatch "
                         f"{ref.microbatch} must be >= 0")
    if ref.num_patches <= 0 or ref.num_tokens <= 0:
        raise ValueError(f"media item {ref.item_id}: {ref.num_patches} patches and "
                         f"{ref.num_tokens} tokens; both must be positive")


def plan_media(refs: Iterable[MediaRef], world: int,
               stage0_rank_of_replica: Callable[[int], int] | Sequence[int],
               cost: Callable[[MediaRef], int] = cost_patches) -> DepPlan:
    """Assign every media item of the global batch to one of `world` encoder ranks by LPT.

    Deterministic and independent of the order of `refs`: items are taken by
    (cost desc, item_id asc); each goes to the least-loaded rank, the lowest
    rank id on ties. `stage0_rank_of_replica` maps a DP replica to the global
    rank of its pipeline stage 0 (a list indexed by replica, or a function).
    """
    if world < 1:
        raise ValueError(f"world={world}: the DEP plan needs at least one rank")
    items = list(refs)
    for ref in items:
        _check_ref(ref)
    items.sort(key=lambda r: r.item_id)
    for before, after in zip(items, items[1:]):
        if before.item_id == after.item_id:
            raise ValueError(f"media item id {after.item_id} appears twice in the global batch: "
                             "item ids must be unique across all replicas and microbatches")
    owners = _owner_table(stage0_rank_of_replica, (r.replica for r in items), world)
    costs = [_checked_cost(cost, ref) for ref in items]

    encoder = [0] * len(items)
    heap = [(0, rank) for rank in range(world)]  # (load, rank): pops least load, then lowest rank
    for index in sorted(range(len(items)), key=lambda i: (-costs[i], items[i].item_id)):
        load, rank = heap[0]
        encoder[index] = rank
        heapq.heapreplace(heap, (load + costs[index], rank))
    return DepPlan(tuple(items), tuple(encoder), tuple(owners[r.replica] for r in items),
                   tuple(costs))


@dataclass(frozen=True)
class ExchangeSplits:
    """One rank's side of the all-to-all that moves embeddings from encoders to owners.

        send buffer = concat(send[0], send[1], ..., send[world-1])   rows of each item, by item_id
        recv buffer = concat(recv[0], recv[1], ..., recv[world-1])   same order on the sender side

    `send[d]` are the items this rank encodes for owner `d`; `recv[s]` the items
    it owns that rank `s` encodes. The gradient exchange is the same with the
    roles swapped (send `recv`, receive `send`).
    """

    send: tuple[tuple[MediaRef, ...], ...]  # per destination rank
    recv: tuple[tuple[MediaRef, ...], ...]  # per source rank

    @property
    def send_rows(self) -> list[int]:
        """`input_split_sizes` of all_to_all_single, in embedding rows (num_tokens)."""
        return [sum(ref.num_tokens for ref in items) for items in self.send]

    @property
    def recv_rows(self) -> list[int]:
        """`output_split_sizes` of all_to_all_single, in embedding rows (num_tokens)."""
        return [sum(ref.num_tokens for ref in items) for items in self.recv]


def send_recv_splits(plan: DepPlan, rank: int, world: int) -> ExchangeSplits:
    """The items `rank` sends to each destination and receives from each source, by item_id."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the job's ranks [0, {world})")
    send: list[list[MediaRef]] = [[] for _ in range(world)]
    recv: list[list[MediaRef]] = [[] for _ in range(world)]
    for ref, enc, own in zip(plan.items, plan.encoder_rank, plan.owner_rank):  # item_id order
        if max(enc, own) >= world:
            raise ValueError(f"the plan sends item {ref.item_id} from rank {enc} to rank {own} "
                             f"but the job has {world} ranks: plan with the job's world size")
        if enc == rank:
            send[own].append(ref)
        if own == rank:
            recv[enc].append(ref)
    return ExchangeSplits(tuple(map(tuple, send)), tuple(map(tuple, recv)))


class DepPlanMismatch(RuntimeError):
    """Ranks computed different DEP plans: their media metadata, order or config differ."""


def _digest_words(digest: str) -> list[int]:
    raw = bytes.fromhex(digest)
    return [int.from_bytes(raw[8 * i:8 * i + 8], "little", signed=True)
            for i in range(_DIGEST_WORDS)]


def _words_digest(words: Sequence[int]) -> str:
    return b"".join(int(w).to_bytes(8, "little", signed=True) for w in words).hex()


def _collective_device(group) -> torch.device:
    """NCCL collectives take tensors on the current CUDA device; gloo takes CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def verify_same_plan(plan: DepPlan, group=None, device: torch.device | None = None,
                     rows_digest: str = "") -> None:
    """Compare the plan digest over `group`; raise DepPlanMismatch on every rank if any differs.

    Call it before any other DEP collective: the digest is a fixed-size tensor,
    so this all_gather completes even when the plans (and so the split sizes of
    the exchange) disagree. `device` defaults to the current CUDA device on
    NCCL and to the CPU otherwise. `rows_digest` (the loader's digest of the
    step's planned rows) is folded in, so ranks whose rows differ where no
    media item shows it are caught too.
    """
    device = device or _collective_device(group)
    mine = plan.digest()
    if rows_digest:
        mine = hashlib.sha256(bytes.fromhex(mine) + rows_digest.encode()).hexdigest()
    local = torch.tensor(_digest_words(mine), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    differing = []
    for group_rank, words in enumerate(gathered):
        theirs = _words_digest(words.cpu().tolist())
        if theirs != mine:
            global_rank = dist.get_global_rank(group, group_rank) if group is not None else group_rank
            differing.append(f"rank {global_rank} has {theirs}")
    if differing:
        raise DepPlanMismatch(
            f"DEP plan mismatch on rank {dist.get_rank()}: this rank's plan digest is {mine}, "
            f"but {'; '.join(differing)}. Every rank must build the plan from the same media "
            "metadata of the step (same data order, seed, loader settings, world size and cost "
            "model): a rank whose data diverged would otherwise train on mismatched data.")

