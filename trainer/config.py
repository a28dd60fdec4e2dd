"""Job configuration: TOML file + command-line overrides, validated in one place.

    torchrun ... -m launch.train --config configs/tiny.toml --train.steps 20 --parallel.pp 2

Every leaf of `JobConfig` is addressable as `--section.key value` (nested
sections too: `--model.lm.layers 8`). Unknown keys and values of the wrong type
are refused with a message naming the key. `JobConfig.validate` is the one
place where combinations are checked, before anything large is allocated.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import os
import textwrap
import tokenize
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dataloader.config import LoaderConfig
from model.config import ConfigError, ModelConfig, preset
from model.memory_policy import MemoryPolicy, MemoryPolicyError
from parallel.layout import PipelineLayout, resolve_layout
from parallel.topology import ParallelSizes, check_layout
from trainer.device import DEVICES


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class JobSection:
    run_dir: str = "runs/demo"  # metrics, logs, checkpoints, profiles and config.json go here
    log_every: int = 1  # console line every N steps (metrics.jsonl gets every step)
    tensorboard: bool = True  # scalars of every metric in <run_dir>/tensorboard
    # intra-op CPU threads per rank. 1 keeps runs bitwise reproducible: with more threads,
    # MKL's matrix products round differently depending on memory alignment
    cpu_threads: int = 1
    # progress watchdog: a rank that finishes no phase of a step (data, forward/backward/
    # optimizer, checkpoint save) in this many seconds logs where it waits and exits 124
    # (trainer/watchdog.py); 0: off. Must exceed the slowest such phase (the first step, a save)
    step_timeout_s: float = 600.0
    # every collective raises after this long instead of waiting forever for a lost peer;
    # keep it above step_timeout_s so that the watchdog's report comes first
    collective_timeout_s: float = 900.0
    # auto (this rank's GPU when CUDA is present, else CPU), cuda (NCCL) or cpu (gloo)
    device: str = "auto"


@dataclass
class TrainSection:
    steps: int = 30  # optimizer steps to train (a resumed run continues up to it)
    seed: int = 0  # seeds the data order and the initial parameters
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
    lr: float = 3e-3  # peak learning rate, after warm-up
    min_lr: float = 3e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 5  # linear warm-up from 0 to lr
    decay_steps: int = 0  # cosine decay length after warm-up; 0 means until train.steps
    weight_decay: float = 0.1  # AdamW decoupled decay of matrices (not norms or biases)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
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
    seq_len: int = 128  # tokens per packed sequence
    media_per_seq: int = 1  # synthetic data: media items per sequence
    max_image_patches_side: int = 8  # synthetic data: largest image side, in patches (even)
    # add the edge cases DEP must handle: one image larger than the rest of the batch,
    # text-only rows and media-only rows
    edge_cases: bool = False


@dataclass
class ParallelSection:
    pp: int = 1  # pipeline stages (ranks per pipeline)
    vpp: int = 1  # virtual stages (chunks) per pipeline rank: interleaved 1F1B when > 1
    ep: int = 1  # expert-parallel size, carved out of the dp ranks of a stage
    dp: int = 1  # data-parallel replicas; world size = pp x dp
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
    # DEP balances the media of this many consecutive DP replicas over all their ranks (one
    # plan per group; 0 = all replicas). Each rank derives its group's media metadata from
    # the dataset index, so this bounds the planning work per rank as dp grows
    dep_group_replicas: int = 8
    # with ep > 1: run chunks node by node and pair steady-state forwards and backwards so
    # expert all-to-alls overlap compute (parallel/chunk_pass.py); false: one call per F/B
    ep_overlap: bool = True


@dataclass
class MemorySection:
    # what autograd keeps for backward (model/memory_policy.py lists the regions): "none"
    # stores everything; "report" is the K2.5 recipe (recompute norms, SwiGLU and MLA's
    # up-projections, FP8 for the expert inputs, offload attention's tensors); "custom" uses
    # the three lists below
    policy: str = "none"
    # custom: regions recomputed in the backward, e.g. moe.experts,dense.ffn,head.loss
    recompute: list[str] = field(default_factory=list)
    fp8: list[str] = field(default_factory=list)  # custom: regions saved in FP8-E4M3
    offload: list[str] = field(default_factory=list)  # custom: regions parked in host memory
    # decoder layers (global indices) whose offload regions are offloaded; empty: all
    offload_layers: list[int] = field(default_factory=list)
    fp8_scaling: str = "row"  # one FP8 scale per "row" (token) or per "tensor"

    def to_policy(self) -> MemoryPolicy:
        try:
            return MemoryPolicy.preset(self.policy, recompute=self.recompute, fp8=self.fp8,
                                       offload=self.offload,
                                       offload_layers=tuple(self.offload_layers),
                                       fp8_scaling=self.fp8_scaling)
        except MemoryPolicyError as e:
            raise ConfigError(str(e)) from None


@dataclass
class CheckpointSection:
    interval: int = 0  # steps between checkpoints; 0 disables
    keep: int = 2  # checkpoints kept (the oldest are deleted)


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
    memory: MemorySection = field(default_factory=MemorySection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    profile: ProfileSection = field(default_factory=ProfileSection)
    resume: str = "none"  # "none", "auto" or a checkpoint path
    # a checkpoint whose model weights start the run when --resume finds none (e.g. one written
    # by `launch.convert import`): step 0, fresh optimizer and data order; its model config is
    # the job's (trainer/init_from.py)
    init_from: str = ""

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
        """Refuse every combination that cannot run, naming what to change: the sizes, then
        whether the planner's predicted peak fits in what a rank may use, then the data."""
        self.validate_sizes(world_size)
        self.check_memory(world_size)
        from trainer.data import check_data_config  # last: it looks at the disk
        check_data_config(self)

    def validate_sizes(self, world_size: int | None = None) -> None:
        """Everything but memory and data: the model, the numbers, the layout."""
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
        if self.job.step_timeout_s < 0 or self.job.collective_timeout_s <= 0:
            raise ConfigError(f"job.step_timeout_s must be >= 0 (0 disables the watchdog) and "
                              f"job.collective_timeout_s > 0 (got {self.job.step_timeout_s}, "
                              f"{self.job.collective_timeout_s})")
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
        if self.job.device not in DEVICES:
            raise ConfigError(f"job.device={self.job.device!r}: choose one of {', '.join(DEVICES)}")
        if self.model.te:
            from model import te_kernels
            if self.job.device == "cpu" or not te_kernels.available():
                raise ConfigError("model.te=true needs a CUDA device and transformer-engine "
                                  "(pip install -e '.[gpu]' with the CUDA build of torch); "
                                  "drop --model.te or set it false")
        if p.encoder not in ("colocated", "dep"):
            raise ConfigError(f"parallel.encoder={p.encoder!r}: choose 'dep' or 'colocated'")
        if p.dep_group_replicas < 0:
            raise ConfigError(f"parallel.dep_group_replicas={p.dep_group_replicas} must be >= 0 "
                              "(0: one DEP plan over every replica)")
        if d.media_per_seq < 0 or d.max_image_patches_side < 2:
            raise ConfigError("data.media_per_seq must be >= 0 and "
                              "data.max_image_patches_side >= 2")
        policy = self.memory.to_policy()
        if any(i >= self.model.lm.layers for i in policy.offload_layers):
            raise ConfigError(f"memory.offload_layers={list(policy.offload_layers)}: the model "
                              f"has decoder layers 0..{self.model.lm.layers - 1}")
        if self.checkpoint.interval < 0 or self.checkpoint.keep < 1:
            raise ConfigError("checkpoint.interval must be >= 0 (0 disables) and "
                              "checkpoint.keep >= 1")
        if self.profile.enabled and not 0 <= self.profile.step < t.steps:
            raise ConfigError(f"profile.step={self.profile.step} must be a step of the run "
                              f"(0 .. train.steps-1 = {t.steps - 1})")
        check_layout(self.parallel_sizes, num_experts=self.model.lm.num_experts,
                     microbatches=self.microbatches_per_replica, world_size=world_size)
        self.pipeline_layout()

    def check_memory(self, world_size: int | None = None) -> None:
        """Refuse, before anything is allocated, a job whose predicted peak on some rank
        (trainer/planner.py) exceeds what a rank may use: under torchrun each rank checks its
        own pipeline rank against MemAvailable / the ranks on its node; otherwise every
        pipeline rank is checked against MemAvailable / pp x dp. The trainer computes on the
        CPU today; the GPU path (issue 13) passes its device (the device's memory)."""
        from trainer.planner import check_fits, rank_memory_budget
        env = os.environ
        world = world_size or self.parallel_sizes.world
        device = torch.device("cpu")
        budget, where = rank_memory_budget(device, int(env.get("LOCAL_WORLD_SIZE", world)))
        pp_ranks = [int(env["RANK"]) // self.parallel.dp] if "RANK" in env else None
        check_fits(self, budget, where, device, pp_ranks)


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
    elif typing.get_origin(kind) is list:  # a TOML list, or "a,b" on the command line
        (item,) = typing.get_args(kind)
        if isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if isinstance(raw, list):
            return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(raw)]
        raise ConfigError(f"{key}: expected a list of {item.__name__} (a TOML list, or "
                          f"comma-separated on the command line), got {raw!r}")
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
            if value.startswith("--"):  # `--job.run_dir --train.steps=2`: a value forgotten
                raise ConfigError(f"{arg} needs a value, got the option {value!r}; write "
                                  f"{arg} VALUE (or {arg}=VALUE)")
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
    # the preset (or --init_from's checkpoint, whatever preset the file names) decides the
    # defaults of every other model field, so it goes first
    preset_name, init_from = None, None
    for key, value in items:
        if key == "model.preset":
            preset_name = _coerce(key, value, str)
        if key == "init_from":
            init_from = _coerce(key, value, str)
    if init_from and any(key == "model.preset" for key, _ in overrides):
        raise ConfigError(f"--init_from {init_from} takes the model config from that checkpoint; "
                          "drop --model.preset")
    if init_from:
        from trainer.init_from import model_config_of
        cfg = JobConfig(model=model_config_of(init_from))
    else:
        cfg = JobConfig(model=preset(preset_name or "tiny"))
    for key, value in items:
        if key != "model.preset":
            _set(cfg, key, value)
    return cfg


def to_dict(cfg: JobConfig) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- help


@dataclass(frozen=True)
class KeyDoc:
    """One leaf of the job config, as `launch.train --help` lists it."""

    key: str
    type: str
    default: object
    doc: str


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: the comment beside its definition, else the comment lines
    right above it (banner lines like '# --- x ---' are headings, not docs). A subclass that
    redefines a field documents it first; undocumented there, its base's comment counts."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        lines, _ = inspect.getsourcelines(klass)
        source = textwrap.dedent("".join(lines))
        comments: dict[int, tuple[str, bool]] = {}  # line -> (text, stands alone on its line)
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                alone = not token.line[:token.start[1]].strip()
                comments[token.start[0]] = (token.string.lstrip("#").strip(), alone)
        for node in ast.parse(source).body[0].body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            beside = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1)
                      if n in comments and not comments[n][1]]
            above, line = [], node.lineno - 1
            while line in comments and comments[line][1] and not comments[line][0].startswith("-"):
                above.insert(0, comments[line][0])
                line -= 1
            text = " ".join(beside or above)
            if text or node.target.id not in docs:
                docs[node.target.id] = text
    return docs


def config_keys(cfg: JobConfig | None = None) -> list[KeyDoc]:
    """Every leaf key of the job config with its type, default (`cfg`'s values; by default
    a fresh JobConfig, whose model fields are the `tiny` preset's) and documentation."""
    out: list[KeyDoc] = []

    def walk(node, prefix: str) -> None:
        docs = _field_docs(type(node))
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            if f.name.startswith("_"):
                continue
            value = getattr(node, f.name)
            if _is_section(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out.append(KeyDoc(f"{prefix}{f.name}", hints[f.name].__name__, value,
                                  docs.get(f.name, "")))

    walk(cfg or JobConfig(), "")
    return out


def help_text() -> str:
    keys = config_keys()
    width = max(len(k.key) for k in keys) + 3  # "--" and a space
    lines = [
        "usage: [torchrun --nproc-per-node N] python -m launch.train [--config FILE.toml] "
        "[--section.key VALUE ...]",
        "",
        "Every key below can be set in the TOML file ([section] key = value) or as "
        "--section.key VALUE. Model defaults are the `tiny` preset's; --model.preset picks "
        "another preset's sizes. Before training, the job is checked, including whether the "
        "planner's predicted memory fits (python -m launch.plan shows it per rank).",
        "",
        f"{'key':<{width}}{'type':<7}{'default':<20}documentation"]
    for k in keys:
        default = repr(k.default) if isinstance(k.default, str) else str(k.default)
        lines.append(f"{'--' + k.key:<{width}}{k.type:<7}{default:<20}{k.doc}")
    return "\n".join(lines)
