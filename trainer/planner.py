"""The planner: what every pipeline rank holds and does in one step, before anything runs.

    JobConfig (model, batch, seq_len, pp/vpp/ep/dp, layout, encoder) + Recipe + media mix
        │
        ▼  per pipeline rank r (its data- and expert-parallel peers hold the same shapes)
    parameters   r's modules built with parameters on `meta` by the engine's own code
                 (parallel/engine.py), grouped as ZeRO-1 groups them, bucket-padded by
                 `parallel.zero1.plan_buckets`    -> weights, grads, master, optimizer state
    activations  model/activation_bytes.py per chunk and microbatch under the job's memory
                 policy (cfg.memory: recompute, FP8, offload), summed over the forwards in
                 flight at r's worst moment of the schedule (parallel/schedule.py); what
                 the policy offloads sits in host memory, reported apart, except the one
                 chunk-microbatch prefetched back ahead of its backward
    DEP          the replica's media embeddings (+ grads) held by stage 0; the encoder's
                 recomputation of r's share, in r's cool-down bubble (parallel/dep_bubbles.py),
                 beside what the pipeline still holds there (model/activation_bytes.py)
    pixels       on the ranks that encode them only (below): uint8 in host memory, fp32 on
                 the device
    FLOPs, time  model/flops.py per chunk -> per-(chunk, microbatch) times -> the schedule
                 simulator (bubble); communication per kind at the GPU's link speeds; DEP
                 phases; the ZeRO-1 step
        │
        ▼
    peak = weights + grads + master + state + pixels (fp32) + DEP embeddings (stage 0)
           + max(activations + prefetched + pipeline buffers in flight,
                 DEP encoder recomputation + what the pipeline holds when it runs)

The memory figures model what this code base holds; tests/distributed/test_planner_memory.py
checks them on CPU against running jobs (parameter, gradient and optimizer bytes exactly,
activations within 5%, pixels exactly: per rank colocated, summed over the ranks under DEP).
The time figures are a crude model, stated where it is made:

- matmuls run at `efficiency` x the GPU's dense bf16 peak (model FLOPs, plus DEP's no-grad
  forward), whatever the recipe; elementwise work, kernel launches and Muon's Newton-Schulz
  iterations cost nothing;
- causal attention over one document per row ((S+1)/2 keys per query): rows packed with
  short documents cost less;
- a ring collective whose group spans nodes runs at the network bandwidth per GPU, inside
  a node at NVLink bandwidth (data-sheet figures, trainer/hardware.py); an all-to-all moves
  its on-node and off-node shares at the same time; no latency terms;
- nothing overlaps: the expert all-to-alls sit inside each chunk's forward and backward,
  the ZeRO-1 reduce-scatters and all-gathers after the pipeline (today's engine; issues
  12 and 14 overlap them), DEP's phases before and after it (the encoder recompute is
  counted after it, although the engine runs it in a pipeline bubble: an overestimate of
  at most that recompute);
- the optimizer update streams master, gradient and state through HBM once.

Media: a mix gives mean items per sequence; each microbatch draws Poisson counts around
them (seeded, so a plan is reproducible). Colocated stage 0 pays for each microbatch's
own media; DEP balances the step's media over all ranks (taken as perfect).

Pixels: a rank decodes only the items it encodes, and no pixels travel between ranks (DEP
sends embeddings and their gradients only):

    rank              patch rows it decodes and encodes per step
    DEP, every rank   its share of the DEP group's media
    colocated, 0      its replica's
    colocated, 1..    none

    host    rows x patch_dim x 1 byte (uint8: the loader's batch) x (1 + the loader's
            data.steps_decoded_ahead: with workers, data.prefetch steps decode meanwhile)
    device  rows x patch_dim x 4 bytes for the whole step: the normalised copy the encoder
            reads (normalize_patches makes fp32 whatever the recipe; DEP: parallel/dep.py,
            colocated: every microbatch's model inputs; one process: one microbatch's)

Known limits of the memory model: routing is taken as perfectly balanced (see
model/activation_bytes.py); the transient working set of one backward (about one layer's
activations again), allocator fragmentation and the optimizer step's temporary buckets are
not counted (`RESERVED_BYTES` stands in for them and for the CUDA context on a GPU);
under a memory policy, the colocated encoder's offloaded bytes are not added to the
host figure (its device bytes are counted), and a recomputed region's working set in the
backward is part of the reserve. Pixels: the uint8 bytes are host memory, reported apart
like offloaded bytes and not in the peak (on a CPU job too, where host and device are the
same memory); while the step loop reads the next batch it still holds the last one's (one
step more, between steps); the workers' decode working set and the memory LRU of encoded
shard bytes (data.memory_cache_mb) are not counted; colocated in fp32 the encoder saves its
input patches without a copy, counted again in the activations; the synthetic source (tests,
demo), where every rank makes the whole global batch's pixels in fp32, is not modelled.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from model.activation_bytes import ActivationSpec, Saved, apply_policy, lm_chunk, vision_encoder
from model.config import ConfigError, ModelConfig
from model.flops import lm_part_flops, vision_flops
from model.memory_policy import MemoryPolicy
from model.vision_language import VisionEncoder
from parallel.dep_bubbles import with_encoder_recompute
from parallel.engine import stage_module, zero1_param_groups
from parallel.schedule import Op, peak_in_flight, schedule
from parallel.schedule_sim import simulate
from parallel.zero1 import DEFAULT_BUCKET_NUMEL, decay_matrices_only, plan_buckets
from trainer.config import JobConfig
from trainer.hardware import GPU

GIB = 1 << 30
UINT8, FP32, INT64 = 1, 4, 8
# On a GPU: the CUDA context, NCCL and cuBLAS workspaces, the transient working set of a
# backward and allocator fragmentation, which the model does not count one by one (crude)
RESERVED_BYTES = 4 * GIB
DEFAULT_EFFICIENCY = 0.6  # fraction of the dense bf16 peak the matmuls sustain (assumed)

Grid = tuple[int, int, int]


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Recipe:
    """Precision and optimizer, and the bytes per parameter element they cost.

    fp32 (today): fp32 weights are their own master; fp32 gradients; AdamW's two fp32
    moments in each rank's ZeRO-1 shard. bf16 (issue 12): bf16 weights, fp32 gradient
    buffers, fp32 master weights and state only in the shard. MuonClip (issue 16): one
    fp32 momentum per element of the hidden matrices (every weight of two or more
    dimensions but the embedding, the head and the router), AdamW's two elsewhere.
    When issue 12 lands, gradients become persistent flat buffers including the bucket
    padding: `grads_padded` becomes True.
    """

    precision: str = "fp32"
    optimizer: str = "adamw"
    grads_padded: bool = False

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision {self.precision!r}: choose fp32 or bf16")
        if self.optimizer not in ("adamw", "muonclip"):
            raise ConfigError(f"optimizer {self.optimizer!r}: choose adamw or muonclip")

    @property
    def weight_bytes(self) -> int:
        return 2 if self.precision == "bf16" else FP32

    @property
    def has_master(self) -> bool:
        return self.precision != "fp32"

    def state_slots(self, name: str, shape: tuple[int, ...]) -> int:
        """fp32 optimizer-state elements per parameter element."""
        if self.optimizer == "adamw":
            return 2
        adamw_only = (len(shape) < 2 or name.endswith(".bias") or ".router." in name
                      or name.startswith(("lm.embed.", "lm.head.")))
        return 2 if adamw_only else 1


@dataclass(frozen=True)
class MediaMix:
    """Media per packed sequence: (mean count, (t, h, w) patch grid) per kind of item.

    `parse("2*1x32x32,0.25*4x16x16")`: on average two 32x32-patch images (448 x 448
    pixels) and a quarter of a 4-frame 16x16 video chunk per sequence.
    """

    kinds: tuple[tuple[float, Grid], ...] = ()

    @classmethod
    def parse(cls, text: str) -> "MediaMix":
        if text.strip().lower() in ("", "none"):
            return cls()
        kinds = []
        for part in text.split(","):
            match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\*(\d+)x(\d+)x(\d+)\s*", part)
            if not match:
                raise ConfigError(f"--media {text!r}: write COUNT*TxHxW items separated by "
                                  f"commas, e.g. '2*1x32x32,0.25*4x16x16' (COUNT per sequence, "
                                  f"T frames, H x W patches)")
            kinds.append((float(match[1]), (int(match[2]), int(match[3]), int(match[4]))))
        return cls(tuple(kinds))

    def check(self, model: ModelConfig, seq_len: int) -> None:
        for count, (t, h, w) in self.kinds:
            if count < 0 or not 1 <= t <= model.vision.max_frames or h <= 0 or w <= 0 \
                    or h % 2 or w % 2:
                raise ConfigError(f"media item {count:g}*{t}x{h}x{w}: the count must be >= 0, "
                                  f"1..{model.vision.max_frames} frames and an even number of "
                                  f"patch rows and columns")
        if self.tokens_per_sequence >= seq_len:
            raise ConfigError(f"the media mix fills {self.tokens_per_sequence:g} of the "
                              f"{seq_len} tokens of a sequence: lower the counts or the sizes")

    @property
    def tokens_per_sequence(self) -> float:
        return sum(count * (h // 2) * (w // 2) for count, (_, h, w) in self.kinds)

    @property
    def patches_per_sequence(self) -> float:
        return sum(count * t * h * w for count, (t, h, w) in self.kinds)

    def sample(self, sequences: int, seed: int) -> list[Grid]:
        """The items of `sequences` sequences: Poisson counts around the means."""
        rng = random.Random(seed)
        items = []
        for count, grid in self.kinds:
            mean, arrivals, n = count * sequences, rng.expovariate(1.0), 0
            while arrivals < mean:  # unit-rate arrivals in [0, mean): a Poisson count
                n += 1
                arrivals += rng.expovariate(1.0)
            items += [grid] * n
        return items

    def describe(self) -> str:
        return ", ".join(f"{c:g}*{t}x{h}x{w}" for c, (t, h, w) in self.kinds) or "none"


# ---------------------------------------------------------------- ZeRO-1 bytes


@dataclass
class GroupBytes:
    """One ZeRO-1 group on one rank."""

    params: int
    group_size: int
    padded: int  # elements of the group's buckets, padding included
    weights: int
    grads: int
    master: int
    state: int


def zero1_bytes(named: list[tuple[str, torch.Tensor]], group_size: int, recipe: Recipe,
                bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> GroupBytes:
    """What one rank of a ZeRO-1 group of `group_size` holds for these parameters (in
    optimizer order; `meta` tensors will do), with the optimizer's own bucket packing
    (parallel/zero1.py): master and state cover the rank's shard of every padded bucket,
    as the optimizer allocates them (MuonClip: the largest any rank's shard needs)."""
    names = [n for n, _ in named]
    shapes = [tuple(p.shape) for _, p in named]
    decays = [decay_matrices_only(n, p) for n, p in named]
    buckets = plan_buckets(shapes, names, decays, bucket_numel=bucket_numel,
                           group_size=group_size)
    numel = sum(math.prod(s) for s in shapes)
    padded = sum(b.padded_numel for b in buckets)
    shard = sum(b.shard_numel for b in buckets)
    if recipe.optimizer == "adamw":
        state = 2 * shard
    else:
        state = max(sum(p.numel * recipe.state_slots(p.slot.name, p.slot.shape)
                        for b in buckets for p in b.pieces(rank)) for rank in range(group_size))
    return GroupBytes(params=numel, group_size=group_size, padded=padded,
                      weights=numel * recipe.weight_bytes,
                      grads=(padded if recipe.grads_padded else numel) * FP32,
                      master=shard * FP32 if recipe.has_master else 0, state=state * FP32)


class _ParametersOnMeta(TorchFunctionMode):
    """`torch.empty` (how every module allocates its parameters) on `meta`: shapes without
    memory. Everything else runs as usual, small buffers on the CPU: many ops on meta
    (arange, normal_) import torch's compiler stack, about 25 s here."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextlib.contextmanager
def _meta_parameters():
    """Build modules with parameters on `meta` and torch.nn.init's initialisers as no-ops
    (there is nothing to initialise)."""
    initialisers = {name: fn for name, fn in vars(torch.nn.init).items()
                    if name.endswith("_") and not name.startswith("_") and callable(fn)}
    try:
        for name in initialisers:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with _ParametersOnMeta():
            yield
    finally:
        for name, fn in initialisers.items():
            setattr(torch.nn.init, name, fn)


# ---------------------------------------------------------------- results


@dataclass
class RankPlan:
    """One pipeline rank: bytes (ints), FLOPs and communication per optimizer step."""

    pp_rank: int
    stages: list[int]
    chunks: list[str]  # the E/t/L symbols of each chunk it holds
    groups: dict[str, GroupBytes]  # ZeRO-1 groups: dense, expert, encoder
    activations: int  # device bytes saved for backward at the rank's worst moment
    pipeline_buffers: int  # outputs of the forwards in flight (held until their backward)
    in_flight: dict[int, int]  # stage -> microbatches in flight at that moment
    stage_activations: dict[int, list[Saved]]  # per mean microbatch: the per-tensor seam
    dep_embeddings: int  # stage 0 under DEP: the replica's media embeddings and their grads
    dep_recompute: int  # the encoder's saved tensors for this rank's share of the media
    dep_recompute_beside: int  # pipeline activations + buffers still held while they live
    pixels: int  # fp32 normalised patches of the items this rank encodes, on the device
    pixels_host: int  # their uint8 pixels in host memory: this step's and those decoded ahead
    offloaded: int = 0  # host bytes the memory policy parked at that moment
    prefetched: int = 0  # the largest chunk-microbatch's offloaded bytes, back on the device
    flops: float = 0.0  # model FLOPs per step
    comm: dict[str, float] = field(default_factory=dict)  # bytes sent per step, by kind
    compute_s: float = 0.0  # matmul time per step
    all_to_all_s: float = 0.0  # expert all-to-all time per step (exposed today)

    def total(self, what: str) -> int:
        return sum(getattr(g, what) for g in self.groups.values())

    @property
    def params(self) -> int:
        return self.total("params")

    @property
    def static(self) -> int:
        return sum(self.total(k) for k in ("weights", "grads", "master", "state")) + self.pixels

    @property
    def peak(self) -> int:
        pipeline = self.activations + self.prefetched + self.pipeline_buffers
        return self.static + self.dep_embeddings + max(
            pipeline, self.dep_recompute_beside + self.dep_recompute)


@dataclass
class StepPlan:
    """Time of one optimizer step (the same on every rank) and its parts, in seconds."""

    step_s: float
    pipeline_s: float
    bubble: float  # simulated: idle share of the busiest rank's pipeline window
    dep_s: float
    optimizer_s: float
    model_flops: float  # the whole job's model FLOPs per step
    mfu: float


@dataclass
class Plan:
    cfg: JobConfig
    recipe: Recipe
    media: MediaMix
    gpu: GPU | None
    efficiency: float
    encoder: str  # the encoder placement the trainer uses
    ranks: list[RankPlan]
    step: StepPlan | None = None
    comparison: dict[str, StepPlan] = field(default_factory=dict)  # text-only, dep, colocated


# ---------------------------------------------------------------- memory


def _single_process(cfg: JobConfig) -> bool:
    """One rank without interleaving: the trainer runs the plain single-process engine (the
    encoder inside the model, torch.optim.AdamW unsharded)."""
    return cfg.parallel_sizes.world == 1 and cfg.parallel.vpp == 1


def encoder_mode(cfg: JobConfig) -> str:
    return "colocated" if _single_process(cfg) else cfg.parallel.encoder


class _Job:
    """What every part of a plan shares: sizes, layout, schedule, media per microbatch."""

    def __init__(self, cfg: JobConfig, recipe: Recipe, media: MediaMix, attention: str,
                 microbatch_media: list[list[Grid]] | None = None,
                 policy: MemoryPolicy | None = None):
        recipe.validate()
        media.check(cfg.model, cfg.data.seq_len)
        p, t = cfg.parallel, cfg.train
        self.cfg, self.recipe, self.media, self.model = cfg, recipe, media, cfg.model
        self.policy = cfg.memory.to_policy() if policy is None else policy
        self.pp, self.vpp, self.ep, self.dp = p.pp, p.vpp, p.ep, p.dp
        self.B, self.S, self.m = t.micro_batch, cfg.data.seq_len, cfg.microbatches_per_replica
        self.world = p.pp * p.dp
        self.mode = encoder_mode(cfg)
        self.layout = cfg.pipeline_layout()
        self.actions = schedule(p.pp, p.vpp, self.m)
        # the engine's schedule under DEP: each rank's encoder recompute R in its cool-down
        self.dep_actions = (with_encoder_recompute(self.actions, p.pp, p.vpp)
                            if self.mode == "dep" else None)
        self.spec = ActivationSpec(compute_bytes=recipe.weight_bytes, attention=attention,
                                   dispatcher="local" if _single_process(cfg) else "all_to_all")
        if microbatch_media is not None and len(microbatch_media) != self.m:
            raise ValueError(f"microbatch_media has {len(microbatch_media)} entries for "
                             f"{self.m} microbatches per replica")
        self.mb_media = microbatch_media or [media.sample(self.B, seed=mb) for mb in range(self.m)]
        self.replica_items = [g for items in self.mb_media for g in items]
        # DEP spreads the step's media evenly over the world: each rank's share, as a
        # fraction of one replica's media
        self.share = self.dp / self.world

    def stages_of(self, pp_rank: int) -> list[int]:
        return list(range(pp_rank, self.pp * self.vpp, self.pp))


def _rank_groups(job: _Job, pp_rank: int, bucket_numel: int, cache: dict
                 ) -> dict[str, GroupBytes]:
    """Build the rank's modules with parameters on `meta` (no memory) exactly as the engine
    does, and size every ZeRO-1 group. `cache` keeps what one plan builds twice."""
    key = (job.mode, pp_rank)
    if key not in cache:
        experts = range(job.model.lm.num_experts // job.ep)  # expert-parallel rank 0 (alike)
        with _meta_parameters():
            stages = {s: stage_module(job.model, job.layout, s, experts, job.mode)
                      for s in job.stages_of(pp_rank)}
            if job.mode == "dep" and "encoder" not in cache:
                cache["encoder"] = VisionEncoder(job.model)
        sizes = {"dense": job.dp, "expert": job.dp // job.ep, "encoder": job.world}
        single = _single_process(job.cfg)
        groups = zero1_param_groups(stages, cache.get("encoder") if job.mode == "dep" else None)
        cache[key] = {kind: zero1_bytes(named, 1 if single else sizes[kind], job.recipe,
                                        bucket_numel) for kind, named in groups.items()}
    return cache[key]


def _media_tokens(items: list[Grid]) -> int:
    return sum((h // 2) * (w // 2) for _, h, w in items)


def _pixel_rows(job: _Job, pp_rank: int) -> tuple[float, float]:
    """Patch rows this rank decodes per step (uint8, host) and holds normalised on the device:
    DEP, its share of the group's media (taken as perfectly balanced); colocated, stage 0
    those of its replica (the single-process engine normalises one microbatch at a time);
    the other stages none."""
    per_mb = [sum(t * h * w for t, h, w in items) for items in job.mb_media]
    if job.mode == "dep":
        return sum(per_mb) * job.share, sum(per_mb) * job.share
    if pp_rank > 0:
        return 0, 0
    return sum(per_mb), max(per_mb) if _single_process(job.cfg) else sum(per_mb)


def _memory(job: _Job, bucket_numel: int, cache: dict, pp_ranks: list[int] | None = None
            ) -> list[RankPlan]:
    model, B, S, c = job.model, job.B, job.S, job.spec.compute_bytes
    D, last = model.lm.hidden, len(job.layout.chunks) - 1
    placed = {s: apply_policy(lm_chunk(model.lm, chunk, B, S, job.spec), job.policy)
              for s, chunk in enumerate(job.layout.chunks)}
    lm = {s: p.device for s, p in placed.items()}
    encoder = [apply_policy(vision_encoder(model, items, job.spec), job.policy).device
               if job.mode == "colocated" else 0 for items in job.mb_media]
    media_index = [INT64 * _media_tokens(items) for items in job.mb_media]

    def held(stage: int, mb: int) -> float:
        """Saved tensors of one chunk's forward on microbatch mb, and its output."""
        out = lm[stage] + (0 if stage == last else B * S * D * c)
        if stage == 0:
            out += media_index[mb] + encoder[mb]
        return out

    mean_tokens = round(job.media.tokens_per_sequence * B)
    mean_media = []
    for count, grid in job.media.kinds:  # the encoder's entries for a mean microbatch
        mean_media += [Saved(e.name, round(e.numel * count * B), e.itemsize)
                       for e in vision_encoder(model, [grid], job.spec)]
    dep = job.mode == "dep"
    pixel_steps = 1 + job.cfg.data.steps_decoded_ahead  # uint8 steps held in host memory
    # the encoder's recomputation of this rank's share: saved bytes are sums over items
    recompute = round(apply_policy(vision_encoder(model, job.replica_items, job.spec),
                                   job.policy).device * job.share) if dep else 0
    ranks = []
    for r in range(job.pp) if pp_ranks is None else pp_ranks:
        peak, in_flight = peak_in_flight(job.actions[r], held)
        beside = _held_at_recompute(job.dep_actions[r], held) if dep else 0
        buffers = sum(n * B * S * D * c for s, n in in_flight.items() if s != last)
        stage_activations = {}
        for s in job.stages_of(r):
            entries = lm_chunk(model.lm, job.layout.chunks[s], B, S, job.spec,
                               media_tokens=mean_tokens)
            stage_activations[s] = entries + (mean_media if s == 0 and not dep else [])
        decoded, normalised = _pixel_rows(job, r)
        ranks.append(RankPlan(
            pp_rank=r, stages=job.stages_of(r),
            chunks=[job.layout.symbols()[s] for s in job.stages_of(r)],
            groups=_rank_groups(job, r, bucket_numel, cache),
            activations=round(peak) - buffers, pipeline_buffers=buffers, in_flight=in_flight,
            stage_activations=stage_activations,
            dep_embeddings=(2 * _media_tokens(job.replica_items) * D * c
                            if dep and r == 0 else 0),
            dep_recompute=recompute, dep_recompute_beside=round(beside) if recompute else 0,
            pixels=round(normalised * model.vision.patch_dim * FP32),
            pixels_host=round(decoded * model.vision.patch_dim * UINT8 * pixel_steps),
            offloaded=sum(n * placed[s].host for s, n in in_flight.items()),
            prefetched=max(placed[s].host for s in job.stages_of(r))))
    return ranks


def _held_at_recompute(actions: list, held: Callable[[int, int], float]) -> float:
    """What the pipeline holds when a rank's R (DEP's encoder recompute) runs: `held` (saved
    tensors and output) of its forwards whose backward comes later (R sits in the cool-down,
    so this only shrinks until the encoder backward frees the recompute's tensors)."""
    total = 0.0
    for action in actions:
        if action.op is Op.R:
            return total
        if action.op in (Op.F, Op.B):
            total += (1 if action.op is Op.F else -1) * held(action.stage, action.microbatch)
    raise ValueError("the schedule has no R action")


def plan_memory(cfg: JobConfig, *, recipe: Recipe = Recipe(), media: MediaMix = MediaMix(),
                attention: str = "dense", bucket_numel: int = DEFAULT_BUCKET_NUMEL,
                pp_ranks: list[int] | None = None,
                microbatch_media: list[list[Grid]] | None = None) -> list[RankPlan]:
    """Bytes of every pipeline rank (or of `pp_ranks`), nothing allocated. `attention`:
    "dense" (the CPU path) or "flash" (fused GPU kernels), see model/activation_bytes.py.
    `microbatch_media`: each microbatch's items when they are known (a replica's step)
    instead of draws from `media`."""
    job = _Job(cfg, recipe, media, attention, microbatch_media)
    return _memory(job, bucket_numel, {}, pp_ranks)


def fullest_ranks(cfg: JobConfig, policies: dict[str, MemoryPolicy],
                  recipes: dict[str, Recipe], *, media: MediaMix = MediaMix(),
                  attention: str = "dense", bucket_numel: int = DEFAULT_BUCKET_NUMEL
                  ) -> dict[tuple[str, str], RankPlan]:
    """The pipeline rank with the largest peak, per (policy name, recipe name): which
    memory policy and optimizer make a layout fit (the modules are built once per recipe)."""
    out = {}
    for recipe_name, recipe in recipes.items():
        cache: dict = {}
        for name, policy in policies.items():
            job = _Job(cfg, recipe, media, attention, policy=policy)
            out[name, recipe_name] = max(_memory(job, bucket_numel, cache), key=lambda r: r.peak)
    return out


# ---------------------------------------------------------------- FLOPs, communication, time


class _Placement:
    """Global rank = pp_rank * dp + dp_rank (parallel/topology.py); nodes of `gpus_per_node`."""

    def __init__(self, job: _Job, gpu: GPU):
        self.dp, self.ep, self.gpu = job.dp, job.ep, gpu

    def node(self, rank: int) -> int:
        return rank // self.gpu.gpus_per_node

    def dense_group(self, pp_rank: int) -> list[int]:
        return [pp_rank * self.dp + d for d in range(self.dp)]

    def ep_group(self, pp_rank: int) -> list[int]:
        return [pp_rank * self.dp + d for d in range(self.ep)]

    def expert_dp_group(self, pp_rank: int) -> list[int]:
        return [pp_rank * self.dp + d for d in range(0, self.dp, self.ep)]

    def link(self, a: int, b: int) -> float:
        """bytes/s from a to b."""
        gb = self.gpu.nvlink_gb_per_s if self.node(a) == self.node(b) else \
            self.gpu.network_gb_per_s
        return gb * 1e9

    def ring_s(self, nbytes: float, ranks: list[int]) -> float:
        """Reduce-scatter or all-gather of an `nbytes` buffer over `ranks`."""
        n = len(ranks)
        if n == 1:
            return 0.0
        slowest = min(self.link(a, b) for a, b in zip(ranks, ranks[1:] + ranks[:1]))
        return nbytes * (n - 1) / n / slowest

    def all_to_all_s(self, nbytes: float, ranks: list[int], me: int) -> float:
        """`me` sends `nbytes` spread evenly over `ranks` (itself included)."""
        n = len(ranks)
        off = sum(self.node(r) != self.node(me) for r in ranks)
        on = n - 1 - off
        return max(nbytes * off / n / (self.gpu.network_gb_per_s * 1e9),
                   nbytes * on / n / (self.gpu.nvlink_gb_per_s * 1e9))


def _step(job: _Job, ranks: list[RankPlan], gpu: GPU, efficiency: float,
          pipelines: dict) -> StepPlan:
    """Step time and MFU; fills each rank's FLOPs, bytes sent and times. `pipelines` keeps
    simulations a plan would repeat (without colocated media the pipeline is the same)."""
    model, B, S, m, dp, world = job.model, job.B, job.S, job.m, job.dp, job.world
    place = _Placement(job, gpu)
    rate = gpu.peak_bf16_tflops * 1e12 * efficiency
    c, D, K = job.recipe.weight_bytes, model.lm.hidden, model.lm.top_k
    chunks = job.layout.chunks
    fwd = [lm_part_flops(model.lm, dense_layers=sum(i < model.lm.first_k_dense for i in ch.layers),
                         moe_layers=sum(i >= model.lm.first_k_dense for i in ch.layers),
                         head=ch.head, tokens=B * S, attended_total=B * S * (S + 1) / 2).forward
           for ch in chunks]  # one microbatch, one document per row
    moe_layers = [sum(i >= model.lm.first_k_dense for i in ch.layers) for ch in chunks]
    media_fwd = [vision_flops(model, items).forward if items else 0.0 for items in job.mb_media]
    colocated = job.mode == "colocated"
    # expert all-to-all: each MoE layer sends T*K rows out and back, in forward and backward
    rows = B * S * K * D * c
    a2a = place.all_to_all_s(rows, place.ep_group(0), 0) if job.ep > 1 else 0.0

    def chunk_flops(s: int, mb: int) -> float:
        return fwd[s] + (media_fwd[mb] if colocated and s == 0 else 0.0)

    def forward_s(s: int, mb: int) -> float:
        return chunk_flops(s, mb) / rate + 2 * moe_layers[s] * a2a

    def backward_s(s: int, mb: int) -> float:
        return 2 * chunk_flops(s, mb) / rate + 2 * moe_layers[s] * a2a

    # hand-overs from the rank of stage r (replica 0) to the rank of stage r + 1, and from
    # the last rank back to the first between virtual stages
    hops = [(r, r + 1) for r in range(job.pp - 1)] + ([(job.pp - 1, 0)] if job.vpp > 1 else [])
    hop = max((B * S * D * c / place.link(a * dp, b * dp) for a, b in hops), default=0.0)
    if job.mode not in pipelines:
        pipelines[job.mode] = simulate(job.actions, job.pp, job.vpp, forward_s, backward_s,
                                       microbatches=m, p2p_latency=hop)
    sim = pipelines[job.mode]
    world_ranks = list(range(world))
    replica_media_fwd = sum(media_fwd)
    share_fwd = replica_media_fwd * job.share
    replica_tokens = _media_tokens(job.replica_items)
    dep_s = 0.0
    if not colocated and job.replica_items:  # each rank decodes its own items: no pixels move
        moves = 2 * place.all_to_all_s(replica_tokens * D * c, world_ranks, 0)
        dep_s = 4 * share_fwd / rate + moves  # no-grad forward, recompute, backward (2x)
    optimizer_s = 0.0
    slots = 3 if job.recipe.optimizer == "adamw" else 2  # master + moments, read and written
    for rank in ranks:
        r = rank.pp_rank
        group_ranks = {"dense": place.dense_group(r), "expert": place.expert_dp_group(r),
                       "encoder": world_ranks}
        step = 0.0
        for kind, g in rank.groups.items():
            grads, weights = g.padded * FP32, g.padded * job.recipe.weight_bytes
            ring = group_ranks[kind]
            step += (place.ring_s(grads, ring) + place.ring_s(weights, ring)
                     + (2 * slots + 1) * FP32 * g.padded / g.group_size / (gpu.hbm_tb_per_s * 1e12))
            if g.group_size > 1:
                moved = (g.group_size - 1) / g.group_size
                rank.comm[f"ZeRO-1 reduce-scatter, {kind}"] = grads * moved
                rank.comm[f"ZeRO-1 all-gather, {kind}"] = weights * moved
        optimizer_s = max(optimizer_s, step)
        sends = sum(1 for a in job.actions[r] if a.op in (Op.SEND_F, Op.SEND_B))
        rank.comm["pipeline p2p"] = sends * B * S * D * c
        layers = sum(moe_layers[s] for s in rank.stages)
        if job.ep > 1:
            rank.comm["expert all-to-all"] = 4 * rows * (job.ep - 1) / job.ep * m * layers
        rank.all_to_all_s = 4 * a2a * m * layers
        if not colocated and job.replica_items:
            moved = (world - 1) / world
            # a rank sends the embeddings it encodes; stage 0 sends its replica's grads back
            rank.comm["DEP embeddings + grads"] = moved * D * c * replica_tokens * (
                job.share + (r == 0))
        rank.flops = 3 * m * sum(fwd[s] for s in rank.stages)
        if colocated:
            rank.flops += 3 * replica_media_fwd if r == 0 else 0.0
            executed = rank.flops
        else:
            rank.flops += 3 * share_fwd
            executed = rank.flops + share_fwd  # DEP's no-grad forward
        rank.compute_s = executed / rate
    step_s = dep_s + sim.makespan + optimizer_s
    model_flops = 3 * dp * (m * sum(fwd) + replica_media_fwd)
    mfu = model_flops / (world * step_s * gpu.peak_bf16_tflops * 1e12)
    return StepPlan(step_s=step_s, pipeline_s=sim.makespan, bubble=sim.bubble_fraction,
                    dep_s=dep_s, optimizer_s=optimizer_s, model_flops=model_flops, mfu=mfu)


def plan(cfg: JobConfig, *, recipe: Recipe = Recipe(), media: MediaMix = MediaMix(),
         gpu: GPU | None = None, efficiency: float = DEFAULT_EFFICIENCY,
         bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> Plan:
    """Memory of every pipeline rank; with a GPU also FLOPs, communication, step time, MFU
    and, for a media mix, the step time of text-only vs DEP vs colocated training. A GPU
    plans fused attention kernels; without one, the CPU path's dense attention."""
    if not 0 < efficiency <= 1:
        raise ConfigError(f"efficiency={efficiency} must be in (0, 1]")
    attention = "flash" if gpu is not None else "dense"
    job, groups, pipelines = _Job(cfg, recipe, media, attention), {}, {}
    result = Plan(cfg, recipe, media, gpu, efficiency, job.mode,
                  _memory(job, bucket_numel, groups))
    if gpu is None:
        return result
    result.step = _step(job, result.ranks, gpu, efficiency, pipelines)
    if media.kinds and not _single_process(cfg):
        for name, mix, mode in (("text-only", MediaMix(), "dep"), ("dep", media, "dep"),
                                ("colocated", media, "colocated")):
            if (mix, mode) == (media, job.mode):
                result.comparison[name] = result.step
                continue
            other = copy.deepcopy(cfg)
            other.parallel.encoder = mode
            other_job = _Job(other, recipe, mix, attention)
            result.comparison[name] = _step(other_job, _memory(other_job, bucket_numel, groups),
                                            gpu, efficiency, pipelines)
    return result


# ---------------------------------------------------------------- the trainer's check


def host_memory_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rank_memory_budget(device: torch.device, ranks_on_node: int) -> tuple[int, str]:
    """(bytes one rank may use, where that number comes from)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return total - RESERVED_BYTES, (f"{torch.cuda.get_device_name(device)}: "
                                        f"{total / GIB:.1f} GiB less {RESERVED_BYTES / GIB:g} "
                                        f"GiB reserved")
    available = host_memory_available()
    return available // max(ranks_on_node, 1), (f"MemAvailable {available / GIB:.1f} GiB / "
                                                f"{ranks_on_node} ranks on this node")


def job_media(cfg: JobConfig) -> MediaMix:
    """The media the memory check assumes: data.media_per_seq images per sequence of
    data.max_image_patches_side^2 patches (the synthetic generator's largest)."""
    d = cfg.data
    mix = MediaMix(((float(d.media_per_seq),
                     (1, d.max_image_patches_side, d.max_image_patches_side)),)
                   if d.media_per_seq else ())
    return mix if mix.tokens_per_sequence < d.seq_len else MediaMix()


def check_fits(cfg: JobConfig, budget: int, where: str, device: torch.device,
               pp_ranks: list[int] | None = None) -> None:
    """Refuse a job whose predicted peak on one of `pp_ranks` (default: every pipeline rank)
    exceeds what a rank may use, with the planner's numbers and what to change."""
    attention = "flash" if device.type == "cuda" else "dense"
    ranks = plan_memory(cfg, media=job_media(cfg), attention=attention, pp_ranks=pp_ranks)
    worst = max(ranks, key=lambda r: r.peak)
    if worst.peak <= budget:
        return
    g = GIB
    raise ConfigError(
        f"the job does not fit: pipeline rank {worst.pp_rank} needs about "
        f"{worst.peak / g:.2f} GiB (weights {worst.total('weights') / g:.2f}, grads "
        f"{worst.total('grads') / g:.2f}, optimizer state {worst.total('state') / g:.2f}, "
        f"activations of {sum(worst.in_flight.values())} chunk-microbatches in flight "
        f"{(worst.activations + worst.prefetched + worst.pipeline_buffers) / g:.2f}) but a "
        f"rank may use {budget / g:.2f} GiB ({where}). Use more ranks (parallel.pp, "
        f"parallel.dp, parallel.ep), a memory policy (memory.policy=report), a smaller "
        f"train.micro_batch or data.seq_len, or a smaller model; "
        f"`python -m launch.plan` with the same sizes shows every rank")
