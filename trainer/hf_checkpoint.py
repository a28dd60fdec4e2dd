"""Hugging Face safetensors checkpoints <-> our DCP checkpoints, streamed one tensor at a time.

    import:  config.json ──> ModelConfig (model/hf_config.py, refuses what we do not implement)
             *.safetensors ─ one tensor (plain read) ─> FP8 block dequant ─> rename + rope rows
                 (model/hf_names.py) ─> DCP writer (one data file per tensor) ─> meta.json,
                 MANIFEST.json, rename into place
    export:  our checkpoint ─ one DCP entry at a time ─> rename + rope rows back ─> safetensors
             shards written header first, then tensor by tensor; index.json; config.json

Two layouts (model/hf_names.py, model/hf_vision_names.py): DeepseekV3ForCausalLM (Kimi K2,
DeepSeek-V3: the LM alone) and KimiK25ForConditionalGeneration (the LM under
`language_model.`, the MoonViT tower and the projector). Export writes the K2.5 layout when
the checkpoint holds the vision encoder (any run's checkpoint does), unless `lm_only`.

Neither direction ever holds more than one tensor (plus the open file's header): DCP's
writer is given shape-only (meta) tensors and this module's planner produces each real
one when the writer asks for it (`resolve_data`). One data file per tensor, because
DCP's writer keeps every tensor of a file alive until the file is closed (torch 2.13,
filesystem.py `tensor_dict`): a single file would hold the whole model.

An imported checkpoint holds the MODEL entries only (no optimizer moments, RNG or data
state) and says so in meta.json (`"weights_only": true`): a run starts from it with
`--init_from PATH` (step 0, a fresh optimizer and data order, trainer/init_from.py);
`--resume` refuses it with that hint. An LM-only import (Kimi K2, DeepSeek-V3) has no
vision tensors: the run initialises the encoder from its seed; a K2.5 import has them all.

FP8: published K2 / DeepSeek-V3 linear weights are float8_e4m3fn with one fp32 scale per
128 x 128 block (`<name>_scale_inv`, the factor that multiplies back): w = q * scale,
dequantised in fp32 and stored as bf16 (or `dtype`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from model.config import ConfigError, ModelConfig, model_config_from_dict
from model.hf_config import is_vlm, k25_config_to_hf, lm_config_to_hf, model_config_from_hf
from model.hf_names import UnknownTensor, name_to_hf, name_to_ours, tensor_to_hf, tensor_to_ours
from model.lm import LanguageModelChunk
from model.param_names import global_named_tensors
from model.vision_language import VisionEncoder
from trainer.checkpoint import MANIFEST, META, _manifest, verify
from trainer.checkpoint_metadata import SafeReader

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.float8_e4m3fn: "F8_E4M3", torch.int64: "I64", torch.int32: "I32"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
SCALE_SUFFIX = "_scale_inv"
MODEL_PREFIX = "model."  # DCP key prefix of model entries (trainer/checkpoint.py saves {"model": ...})


def expected_tensors(cfg: ModelConfig, vision: bool) -> dict[str, torch.Tensor]:
    """{our global name: meta tensor of its shape and dtype} of the whole LM (parameters and
    the routers' balancing biases: what checkpoints hold), and with `vision` the encoder's."""
    with torch.device("meta"):
        lm = LanguageModelChunk(cfg.lm)
        encoder = VisionEncoder(cfg) if vision else None
    out = dict(global_named_tensors(lm, prefix="lm"))
    out.update({n: b for n, b in lm.named_buffers(prefix="lm") if n.endswith("router.bias")})
    if encoder is not None:
        out.update(global_named_tensors(encoder, prefix="vision"))
    return out


# ---------------------------------------------------------------- import


@dataclass
class _Source:
    file: Path
    hf_name: str
    scale: tuple[Path, str] | None  # FP8: where its block scales are


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """({name: {dtype, shape, data_offsets}}, where the data starts) of a safetensors file."""
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > 100 << 20:
            raise ConfigError(f"{path}: a {length}-byte header is not a safetensors file")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


class _HFTensors:
    """Reads single tensors out of safetensors files with plain reads, one file open at a time.

    Not `safetensors.safe_open`: it memory-maps the file, and the pages of every tensor read
    stay resident (counted in the process's RSS) until the file is closed, so converting a
    5 GiB shard would look like 5 GiB of memory. A read into a fresh buffer is freed with
    the tensor."""

    def __init__(self):
        self._path, self._file, self._header, self._start = None, None, None, 0

    def get(self, path: Path, name: str) -> torch.Tensor:
        if self._path != path:
            self.close()
            self._header, self._start = read_safetensors_header(path)
            self._file, self._path = path.open("rb"), path
        entry = self._header[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        self._file.seek(self._start + begin)
        if self._file.readinto(buffer) != len(buffer):
            raise ConfigError(f"{path}: {name} is truncated")
        dtype = _TORCH_DTYPES[entry["dtype"]]
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._path, self._file = None, None


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
                      ) -> torch.Tensor:
    """fp32 q * scale, one scale per `block` (the last row/column blocks may be partial)."""
    rows, cols = q.shape
    br, bc = block
    need = (math.ceil(rows / br), math.ceil(cols / bc))
    if tuple(scale.shape) != need:
        raise ValueError(f"FP8 weight {tuple(q.shape)} with {block} blocks needs a {need} scale, "
                         f"got {tuple(scale.shape)}")
    full = scale.float().repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return q.float() * full


def _weight_map(src: Path) -> dict[str, Path]:
    """{HF tensor name: its file}: from model.safetensors.index.json, else every *.safetensors."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return {name: src / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{src} holds no *.safetensors files")
    return {name: file for file in files for name in read_safetensors_header(file)[0]}


class _ImportPlanner(DefaultSavePlanner):
    """Produces each tensor when DCP's writer asks for it (the state dict holds meta tensors)."""

    def __init__(self, produce):
        super().__init__()
        self._produce = produce

    def resolve_data(self, write_item):
        fqn = write_item.index.fqn
        if not fqn.startswith(MODEL_PREFIX):
            return super().resolve_data(write_item)
        return self._produce(fqn[len(MODEL_PREFIX):])


def _write_atomically(dst: Path, write) -> None:
    """`write(tmp)` into a sibling temporary directory, then rename it to `dst`."""
    if dst.exists():
        raise ConfigError(f"{dst} exists: choose a new directory (nothing was written)")
    tmp = dst.parent / f".tmp-{dst.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, dst)


def import_hf(src: Path, dst: Path, vision_preset: str = "k25", media_token_id: int | None = None,
              dtype: str | None = None, log=print) -> ModelConfig:
    """Convert the HF checkpoint directory `src` into our checkpoint directory `dst`.
    `dtype`: fp32 / bf16 for every floating tensor; None keeps the stored dtype (FP8 -> bf16)."""
    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{src} has no config.json: point --from at a Hugging Face checkpoint "
                          "directory")
    hf = json.loads(config_path.read_text())
    cfg = model_config_from_hf(hf, vision_preset, media_token_id)
    k25 = is_vlm(hf)
    text = hf["text_config"] if k25 else hf
    interleaved = bool(text.get("rope_interleave", True))
    quant = hf.get("quantization_config") or text.get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size") or (128, 128))
    if quant and quant.get("quant_method") != "fp8":
        raise ConfigError(f"quantization_config with quant_method "
                          f"{quant.get('quant_method')!r}: only fp8 block quantisation is read "
                          "(dequantise other formats, e.g. K2.5's INT4 compressed-tensors "
                          "experts, to bf16 first)")
    out_dtype = DTYPES[dtype] if dtype else None

    expected = expected_tensors(cfg, vision=k25)
    weight_map = _weight_map(src)
    sources: dict[str, _Source] = {}
    skipped = []
    for hf_name, file in weight_map.items():
        if hf_name.endswith(SCALE_SUFFIX):
            continue
        try:
            ours = name_to_ours(hf_name, cfg, k25)
        except UnknownTensor:
            raise ConfigError(f"{src}: tensor {hf_name!r} has no counterpart in our model "
                              "(model/hf_names.py, model/hf_vision_names.py); is this a "
                              "DeepseekV3 / Kimi checkpoint?") from None
        if ours is None:
            skipped.append(hf_name)
            continue
        scale_name = hf_name + SCALE_SUFFIX
        scale = (weight_map[scale_name], scale_name) if scale_name in weight_map else None
        sources[ours] = _Source(file, hf_name, scale)
    missing = sorted(set(expected) - set(sources))
    extra = sorted(set(sources) - set(expected))
    if missing or extra:
        raise ConfigError(f"{src} does not match its config.json: missing {missing[:5]} "
                          f"({len(missing)}), unexpected {extra[:5]} ({len(extra)})")

    reader = _HFTensors()

    def stored_dtype(name: str, source: torch.dtype) -> torch.dtype:
        """FP8 -> `dtype` or bf16; weights -> `dtype` if given; the rest (router biases) as is."""
        if source == torch.float8_e4m3fn:
            return out_dtype or torch.bfloat16
        if out_dtype is not None and source.is_floating_point and name.endswith("weight"):
            return out_dtype
        return source

    def produce(name: str) -> torch.Tensor:
        s = sources[name]
        w = reader.get(s.file, s.hf_name)
        if w.dtype == torch.float8_e4m3fn:
            if s.scale is None:
                raise ConfigError(f"{s.hf_name} is FP8 but the checkpoint has no "
                                  f"{s.hf_name}{SCALE_SUFFIX}")
            scale = _HFTensors().get(*s.scale) if s.scale[0] != s.file else reader.get(*s.scale)
            w = dequantize_blocks(w, scale, block)
        w = w.to(stored_dtype(name, w.dtype))
        w = tensor_to_ours(name, w, cfg, interleaved)
        if tuple(w.shape) != tuple(expected[name].shape):
            raise ConfigError(f"{s.hf_name}: shape {tuple(w.shape)}, our {name} needs "
                              f"{tuple(expected[name].shape)}")
        return w.contiguous()

    # DCP's entries, shape and dtype only (from the headers): produce() makes each tensor
    headers = _header_dtypes(weight_map)
    state = {name: torch.empty(expected[name].shape, device="meta",
                               dtype=stored_dtype(name, headers[sources[name].hf_name]))
             for name in sorted(sources, key=lambda n: (str(sources[n].file), sources[n].hf_name))}

    started = time.perf_counter()

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group: assuming a single process"
            # no fsync per file (1000s of serial fsyncs were a quarter of the time): one
            # os.sync below, and the MANIFEST's crc32s catch whatever a crash leaves behind
            dcp.save({"model": state},
                     storage_writer=dcp.FileSystemWriter(str(tmp), single_file_per_rank=False,
                                                         sync_files=False),
                     planner=_ImportPlanner(produce), no_dist=True)
        reader.close()
        os.sync()
        meta = {"step": 0, "model": dataclasses.asdict(cfg), "weights_only": True,
                "layout": {"world": 1}, "data": None,
                "source": {"format": "hf", "path": str(src), "config": hf,
                           "rope_interleave": interleaved},
                "saved_at": time.time()}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        with (tmp / MANIFEST).open("w") as f:
            json.dump(_manifest(tmp), f, indent=1)

    _write_atomically(dst, write)
    log(f"imported {len(state)} tensors from {src} into {dst} in "
        f"{time.perf_counter() - started:.1f} s"
        + (f"; skipped {len(skipped)} multi-token-prediction tensors" if skipped else "")
        + ("" if k25 else "; the vision encoder is not in the checkpoint (a run initialises it "
           "from its seed)"))
    return cfg


def _header_dtypes(weight_map: dict[str, Path]) -> dict[str, torch.dtype]:
    return {name: _TORCH_DTYPES[entry["dtype"]] for file in sorted(set(weight_map.values()))
            for name, entry in read_safetensors_header(file)[0].items()}


# ---------------------------------------------------------------- export


def _write_safetensors_header(f, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
    """The safetensors header for tensors written next, in this order, back to back."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def export_hf(src: Path, dst: Path, dtype: str | None = None, shard_bytes: int = 5 << 30,
              lm_only: bool = False, log=print) -> None:
    """Write our checkpoint `src` as a Hugging Face checkpoint directory `dst` (safetensors
    shards of at most `shard_bytes` each, model.safetensors.index.json, config.json): a
    KimiK25ForConditionalGeneration if it holds the vision encoder, else (or with `lm_only`)
    a DeepseekV3ForCausalLM of its LM."""
    src, dst = Path(src), Path(dst)
    problem = verify(src) if src.is_dir() else "no such directory"
    if problem is not None:
        raise ConfigError(f"--from {src}: cannot use this checkpoint: {problem}")
    meta = json.loads((src / META).read_text())
    cfg = model_config_from_dict(meta["model"])
    out_dtype = DTYPES[dtype] if dtype else None
    base = (meta.get("source") or {}).get("config")

    reader = SafeReader(src)
    reader.check()
    entries = reader.read_metadata().state_dict_metadata
    names = sorted((k[len(MODEL_PREFIX):] for k in entries if k.startswith(MODEL_PREFIX)),
                   key=_export_order)
    k25 = not lm_only and any(n.startswith("vision.") for n in names)
    names = [n for n in names if k25 or n.startswith("lm.")]
    # the config first: it refuses what the format cannot express before anything is written
    config = k25_config_to_hf(cfg, base) if k25 else lm_config_to_hf(
        cfg.lm, base["text_config"] if base and is_vlm(base) else base)

    def out_type(name: str) -> torch.dtype:
        stored = entries[MODEL_PREFIX + name].properties.dtype
        if out_dtype is not None and stored.is_floating_point() and name.endswith("weight") \
                and "router.bias" not in name:
            return out_dtype
        return stored

    def hf_shape(name: str) -> tuple[int, ...]:  # the layout change on a shape-only tensor
        stored = torch.empty(entries[MODEL_PREFIX + name].size, device="meta")
        return tuple(tensor_to_hf(name, stored, cfg).shape)

    plan = [(name, name_to_hf(name, k25), out_type(name), hf_shape(name)) for name in names]
    shards, current, size = [], [], 0
    for item in plan:
        nbytes = math.prod(item[3]) * torch.empty((), dtype=item[2]).element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    if current:
        shards.append(current)

    started = time.perf_counter()

    def read(name: str) -> torch.Tensor:
        meta_entry = entries[MODEL_PREFIX + name]
        t = torch.empty(meta_entry.size, dtype=meta_entry.properties.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load({"model": {name: t}}, storage_reader=reader, no_dist=True)
        return t

    def write(tmp: Path) -> None:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with (tmp / file).open("wb") as f:
                _write_safetensors_header(f, [(hf, dt, shape) for _, hf, dt, shape in shard])
                for name, hf, dt, _ in shard:
                    t = read(name)
                    t = tensor_to_hf(name, t, cfg)
                    f.write(_tensor_bytes(t.to(dt)))
                    weight_map[hf] = file
                    total += t.numel() * t.element_size()
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))

    _write_atomically(dst, write)
    log(f"exported {len(plan)} tensors from {src} to {dst} ({len(shards)} shards) in "
        f"{time.perf_counter() - started:.1f} s")


def _export_order(name: str):
    """Layers in numeric order (lm.layers.10 after lm.layers.9), experts likewise."""
    return [int(p) if p.isdigit() else p for p in name.split(".")]
