"""Start a run from the model weights of a checkpoint: `--init_from PATH`.

    --resume (auto | PATH) finds a checkpoint of this run?  yes -> resume it (step, moments,
                                                                  data order, RNG)
                                                            no  -> --init_from PATH given?
                                                                   yes -> weights from PATH,
                                                                          step 0, fresh moments
                                                                          and data order

So `--resume auto --init_from IMPORTED` starts from published weights the first time and
continues from the run's own checkpoints after a restart. The checkpoint's model config
is the job's (`load_config` takes it from meta.json; `--model.*` overrides must agree,
`read_meta` refuses a difference). Names the checkpoint lacks (the vision encoder of an
LM-only import) keep their seeded initialisation; rank 0 says which.

Optimizer state starts fresh by design: an imported checkpoint has none (published weights
come without moments), and ZeRO-1's master weights are the fp32 parameters themselves, so
loading the parameters is all a fresh start needs. Every rank loads only the names it
holds (DCP reads the slices each rank asks for), so any layout can start from one import.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from model.config import ConfigError, ModelConfig, model_config_from_dict
from trainer.checkpoint import META, CheckpointManager, verify
from trainer.checkpoint_metadata import SafeReader

MODEL = "model."  # DCP key prefix of the model entries


def checked_path(path: str) -> Path:
    checkpoint = Path(path)
    problem = verify(checkpoint) if checkpoint.is_dir() else "no such directory"
    if problem is not None:
        raise ConfigError(f"--init_from {path}: cannot use this checkpoint: {problem}")
    return checkpoint


def model_config_of(path: str) -> ModelConfig:
    """The model config a checkpoint was saved (or imported) with."""
    return model_config_from_dict(json.loads((checked_path(path) / META).read_text())["model"])


def is_weights_only(path: Path) -> bool:
    return bool(json.loads((path / META).read_text()).get("weights_only"))


def load_weights(path: str, named_tensors: dict[str, torch.Tensor], model_config: dict
                 ) -> list[str]:
    """Collective: fill this rank's `named_tensors` (global names) from checkpoint `path`;
    return the names the checkpoint does not hold (left as initialised)."""
    checkpoint = checked_path(path)
    CheckpointManager.read_meta(checkpoint, model_config)
    reader = SafeReader(checkpoint)
    reader.check()  # before any collective: a refusal is the same on every rank
    stored = reader.read_metadata().state_dict_metadata
    present = {n: t for n, t in named_tensors.items() if MODEL + n in stored}
    for name, t in present.items():
        if tuple(stored[MODEL + name].size) != tuple(t.shape):
            raise ConfigError(f"--init_from {path}: {name} is {tuple(stored[MODEL + name].size)} "
                              f"in the checkpoint, {tuple(t.shape)} here")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load({"model": present}, storage_reader=reader)
    except (Exception, CheckpointException) as e:
        raise ConfigError(f"--init_from {path}: loading the weights failed: {e}") from e
    return sorted(set(named_tensors) - set(present))
