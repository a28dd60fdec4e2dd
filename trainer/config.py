"""Job configuration: TOML file + command-line overrides, validated in one place.

    torchrun ... -m launch.train --config configs/tiny.toml --train.steps 20 --parallel.pp 2

Every leaf of `JobConfig` is addressable as `--section.key value` (nested
sections too: `--model.lm.layers 8`). Unknown keys and values of the wrong type
are refused with a message naming the key. `JobConfig.validate` is the one
place where combinations are checked, before anything large is allocated.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dataloader.config import LoaderConfig
from model.config import ConfigError, ModelConfig, preset
from parallel.layout import PipelineLayout, resolve_layout
from parallel.topology import ParallelSizes, check_layout


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class JobSection:
    run_dir: str = "runs/demo"
    log_every: int = 1  # console line every N steps (metrics.jsonl gets every step)
    tensorboard: bool = True  # scalars of every metric in <run_dir>/tensorboard
    # intra-op CPU threads per rank. 1 keeps runs bitwise reproducible: with more threads,
    # MKL's matrix products round differently depending on memory alignment
    cpu_threads: int = 1


@dataclass
class TrainSection:
    steps: int = 30
    seed: int = 0
    global_batch: int = 8  # sequences per optimizer step, over all data-parallel replicas
    micro_batch: int = 1  # sequences per microbatch
    # compute dtype of weights and activations. "bf16": router scores, norm statistics,
    # softmax and the loss stay fp32; gradients accumulate in fp32; fp32 master weights
    # and optimizer state live in each rank's ZeRO-1 shard
    dtype: str = "fp32"


OPTIMIZERS = ("adamw", "muonclip")


@dataclass
class OptimSection:
    # "adamw", or "muonclip": Muon for the hidden matrices (each expert its own matrix,
    # update RMS matched to AdamW's, so lr and weight_decay carry over) with QK-Clip per
    # MLA head, AdamW (beta1, beta2, eps) for embeddings, head, norms and biases
    name: str = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 5
    decay_steps: int = 0  # cosine decay length after warm-up; 0 means until train.steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    muon_momentum: float = 0.95  # muonclip: Nesterov momentum
    muon_ns_steps: int = 5  # muonclip: Newton-Schulz iterations
    qk_clip_tau: float = 100.0  # muonclip: largest pre-softmax logit allowed per MLA head

    def update_rule(self):
        """The ZeRO-1 update rule these settings describe (for every parameter with
        AdamW; for those `matrix_rule` does not take with MuonClip)."""
        from parallel.adamw import AdamW, AdamWConfig
        return AdamW(AdamWConfig(beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                                 weight_decay=self.weight_decay))

    def matrix_rule(self, lm):
        """The rule of the hidden matrices: Muon with QK-Clip for ``muonclip`` (``lm``: the
        LM config, for the heads' geometry), None for ``adamw``."""
        if self.name != "muonclip":
            return None
        from parallel.muon import Muon, MuonConfig
        from parallel.qk_clip import MLAHeads, QKClip
        heads = MLAHeads(lm.heads, lm.qk_nope_head_dim, lm.qk_rope_head_dim, lm.v_head_dim)
        return Muon(MuonConfig(momentum=self.muon_momentum, ns_steps=self.muon_ns_steps,
                               weight_decay=self.weight_decay),
                    clip=QKClip(heads, tau=self.qk_clip_tau))


@dataclass
class DataSection(LoaderConfig):
    """Every streaming-loader setting (dataloader/config.py) plus the synthetic generator's."""

    uri: str = "data/demo"  # dataset directory, s3://bucket/prefix, or "synthetic"
    seq_len: int = 128
    # synthetic generator only: media per sequence and the largest image side in patches
    media_per_seq: int = 1
    max_image_patches_side: int = 8
    # add the edge cases DEP must handle: one image larger than the rest of the batch,
    # text-only rows and media-only rows
    edge_cases: bool = False


@dataclass
class ParallelSection:
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    dp: int = 1
    # "dep": Decoupled Encoder Process (encoder replicated on all ranks, outside the pipeline);
    # "colocated": encoder inside pipeline stage 0 (the baseline most VLM trainers use)
    encoder: str = "dep"
    # which layers each of the pp x vpp chunks holds: "auto" (balanced by a cost model) or
    # Megatron-style notation, E embedding, t decoder layer, L head+loss, | between chunks,
    # X*N repeats: e.g. "Et|(tt|)*30L" (parallel/layout.py)
    layout: str = "auto"
    # ZeRO-1: elements per gradient bucket (a parameter never straddles two); a bucket's
    # reduce-scatter starts during the backward once its parameters' grads are final
    bucket_numel: int = 40_000_000
    overlap_grad_reduce: bool = True  # false: every reduce-scatter waits for the optimizer step


@dataclass
class CheckpointSection:
    interval: int = 0  # steps between checkpoints; 0 disables
    keep: int = 2


@dataclass
class ProfileSection:
    enabled: bool = False  # profile one step: trace.json, gantt.png, stages.txt in <run_dir>/profile
    step: int = 2  # which step (after warm-up steps)
    torch_profiler: bool = False  # also a torch.profiler trace per rank


@dataclass
class JobConfig:
    job: JobSection = field(default_factory=JobSection)
    model: ModelConfig = field(default_factory=lambda: preset("tiny"))
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    profile: ProfileSection = field(default_factory=ProfileSection)
    resume: str = "none"  # "none", "auto" or a checkpoint path

    @property
    def parallel_sizes(self) -> ParallelSizes:
        p = self.parallel
        return ParallelSizes(pp=p.pp, vpp=p.vpp, ep=p.ep, dp=p.dp)

    def pipeline_layout(self) -> PipelineLayout:
        """Which layers live in which pipeline chunk (raises LayoutError if impossible)."""
        p = self.parallel
        return resolve_layout(p.layout, self.model.lm, pp=p.pp, vpp=p.vpp,
                              seq_len=self.data.seq_len, micro_batch=self.train.micro_batch,
                              ep=p.ep)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.train.dtype]

    @property
    def microbatches_per_replica(self) -> int:
        return self.train.global_batch // (self.parallel.dp * self.train.micro_batch)

    def validate(self, world_size: int | None = None) -> None:
        """Refuse every combination that cannot run, naming what to change."""
        self.model.validate()
        t, p, o, d = self.train, self.parallel, self.optim, self.data
        for key, value in {"train.steps": t.steps, "train.global_batch": t.global_batch,
                           "train.micro_batch": t.micro_batch, "data.seq_len": d.seq_len,
                           "parallel.pp": p.pp, "parallel.vpp": p.vpp, "parallel.ep": p.ep,
                           "parallel.dp": p.dp, "parallel.bucket_numel": p.bucket_numel,
                           "job.log_every": self.job.log_every,
                           "job.cpu_threads": self.job.cpu_threads}.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
            raise ConfigError(f"need 0 <= optim.min_lr <= optim.lr and optim.lr > 0 "
                              f"(got lr={o.lr}, min_lr={o.min_lr})")
        if o.warmup_steps < 0 or o.decay_steps < 0 or o.grad_clip < 0 or o.weight_decay < 0:
            raise ConfigError("optim.warmup_steps, optim.decay_steps, optim.grad_clip and "
                              "optim.weight_decay must be >= 0")
        if o.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name={o.name!r}: choose one of {', '.join(OPTIMIZERS)}")
        if o.name == "muonclip" and not (0 <= o.muon_momentum < 1 and 1 <= o.muon_ns_steps < 100
                                         and o.qk_clip_tau > 0):
            raise ConfigError(f"muonclip needs 0 <= optim.muon_momentum < 1 (got "
                              f"{o.muon_momentum}), 1 <= optim.muon_ns_steps < 100 (got "
                              f"{o.muon_ns_steps}) and optim.qk_clip_tau > 0 (got "
                              f"{o.qk_clip_tau})")
        if t.global_batch % (p.dp * t.micro_batch):
            raise ConfigError(
                f"train.global_batch={t.global_batch} must be divisible by parallel.dp x "
                f"train.micro_batch = {p.dp} x {t.micro_batch}")
        if t.dtype not in DTYPES:
            raise ConfigError(f"train.dtype={t.dtype!r}: choose one of {sorted(DTYPES)}")
        if p.encoder not in ("colocated", "dep"):
            raise ConfigError(f"parallel.encoder={p.encoder!r}: choose 'dep' or 'colocated'")
        if d.media_per_seq < 0 or d.max_image_patches_side < 2:
            raise ConfigError("data.media_per_seq must be >= 0 and "
                              "data.max_image_patches_side >= 2")
        if self.checkpoint.interval < 0 or self.checkpoint.keep < 1:
            raise ConfigError("checkpoint.interval must be >= 0 (0 disables) and "
                              "checkpoint.keep >= 1")
        if self.profile.enabled and not 0 <= self.profile.step < t.steps:
            raise ConfigError(f"profile.step={self.profile.step} must be a step of the run "
                              f"(0 .. train.steps-1 = {t.steps - 1})")
        if self.model.preset == "k25":
            raise ConfigError("model.preset='k25' is the full 1T-parameter model: it is only "
                              "counted (python -m launch.plan --model k25), not trained here")
        check_layout(self.parallel_sizes, num_experts=self.model.lm.num_experts,
                     microbatches=self.microbatches_per_replica, world_size=world_size)
        self.pipeline_layout()
        from trainer.data import check_data_config  # last: it looks at the disk
        check_data_config(self)


# ---------------------------------------------------------------- loading

def _is_section(value) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _coerce(key: str, raw, kind):
    """Turn a TOML or command-line value into the field's type, or refuse."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
            return raw.lower() in ("true", "1", "yes")
    elif kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw)
            except ValueError:
                pass
    elif kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(raw, str):
            return raw
    raise ConfigError(f"{key}: expected {kind.__name__}, got {raw!r}")


def _set(cfg, dotted: str, raw) -> None:
    *path, leaf = dotted.split(".")
    node = cfg
    for i, part in enumerate(path):
        child = getattr(node, part, None) if part in _field_names(node) else None
        if not _is_section(child):
            raise ConfigError(f"unknown config key {dotted!r} (no section "
                              f"{'.'.join(path[:i + 1])!r})")
        node = child
    if leaf not in _field_names(node) or _is_section(getattr(node, leaf)):
        known = ", ".join(sorted(n for n in _field_names(node)
                                 if not _is_section(getattr(node, n))))
        raise ConfigError(f"unknown config key {dotted!r}; keys here: {known}")
    kind = typing.get_type_hints(type(node))[leaf]
    setattr(node, leaf, _coerce(dotted, raw, kind))


def _field_names(node) -> set[str]:
    return {f.name for f in dataclasses.fields(node)}


def _flatten(table: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            items.extend(_flatten(value, dotted + "."))
        else:
            items.append((dotted, value))
    return items


def parse_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Split `--config PATH --a.b value --c=value` into the path and the overrides."""
    config_path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key value")
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            config_path = value
        else:
            overrides.append((key, value))
    return config_path, overrides


def load_config(argv: list[str]) -> JobConfig:
    """Build the job config from `--config FILE` and overrides; validated by the caller."""
    config_path, overrides = parse_overrides(argv)
    table: dict = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"--config {config_path}: no such file")
        with path.open("rb") as f:
            try:
                table = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"--config {config_path}: not valid TOML: {e}") from None
    items = _flatten(table) + overrides
    # the preset decides the defaults of every other model field, so it goes first
    preset_name = "tiny"
    for key, value in items:
        if key == "model.preset":
            preset_name = _coerce(key, value, str)
    cfg = JobConfig(model=preset(preset_name))
    for key, value in items:
        if key != "model.preset":
            _set(cfg, key, value)
    return cfg


def to_dict(cfg: JobConfig) -> dict:
    return dataclasses.asdict(cfg)
