"""Where the trainer's batches come from: the streaming loader, or the synthetic generator.

Both hand every rank the rows of ITS data-parallel replica for the next step (all
pipeline stages of a replica get the same rows) and have a state that a
checkpoint stores, so a resumed run continues the identical data sequence.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from dataloader.batch import Batch
from dataloader.config import LoaderConfig, LoaderConfigError
from dataloader.synthetic import SyntheticBatches, SyntheticConfig
from model.config import ConfigError
from trainer.config import JobConfig


@contextmanager
def _refusals(uri: str):
    """The loader's refusals at start (a malformed manifest, a store that says no, a loader
    state of another dataset) as one-line ConfigErrors; failures later in the run stay
    exceptions with their traceback."""
    from dataloader.dataset import DatasetError
    from dataloader.loader import LoaderStateError
    from dataloader.store import StoreError

    try:
        yield
    except (DatasetError, LoaderStateError, StoreError) as e:
        raise ConfigError(f"data.uri={uri}: {e}") from e


def loader_config(cfg: JobConfig) -> LoaderConfig:
    """The loader's own settings out of the job's data section (a superset of them)."""
    return LoaderConfig(**{name: getattr(cfg.data, name)
                           for name in LoaderConfig.__dataclass_fields__})


class SyntheticSource:
    """The built-in generator: the global batch of step s is a pure function of (seed, s)."""

    def __init__(self, cfg: JobConfig, dp_rank: int, dp: int):
        self.generator = SyntheticBatches(SyntheticConfig(
            seq_len=cfg.data.seq_len, vocab_size=cfg.model.lm.vocab_size,
            media_token_id=cfg.model.media_token_id, patch_dim=cfg.model.vision.patch_dim,
            media_per_seq=cfg.data.media_per_seq, max_side=cfg.data.max_image_patches_side,
            max_frames=cfg.model.vision.max_frames, edge_cases=cfg.data.edge_cases),
            seed=cfg.train.seed)
        self.rows = cfg.train.global_batch // dp
        self.global_rows = cfg.train.global_batch
        self.dp_rank = dp_rank
        self.step = 0

    def next_batch(self) -> Batch:
        batch = self.generator.global_batch(self.step, self.global_rows)
        self.step += 1
        return batch.rows(self.dp_rank * self.rows, (self.dp_rank + 1) * self.rows)

    def state_dict(self) -> dict:
        return {"synthetic_step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if "synthetic_step" not in state:
            raise ConfigError("the checkpoint was written by a run on a dataset (the streaming "
                              "loader), not on synthetic data: resume it with that run's "
                              "data.uri")
        self.step = int(state["synthetic_step"])

    def close(self) -> None:
        pass


class LoaderSource:
    """The deterministic streaming loader over a local directory or S3 (dataloader/)."""

    def __init__(self, cfg: JobConfig, dp_rank: int, dp: int):
        from dataloader.loader import build_loader

        with _refusals(cfg.data.uri):
            self.loader = build_loader(loader_config(cfg), seed=cfg.train.seed, dp_rank=dp_rank,
                                       dp_size=dp, rows_per_step=cfg.train.global_batch // dp)
        vocab, media_id, _ = self.loader.tokenizer_info
        if vocab > cfg.model.lm.vocab_size or media_id != cfg.model.media_token_id:
            raise ConfigError(
                f"the dataset's tokenizer has {vocab} tokens and media token id {media_id}; the "
                f"model has model.lm.vocab_size={cfg.model.lm.vocab_size} and "
                f"model.media_token_id={cfg.model.media_token_id}: make them match")

    def next_batch(self) -> Batch:
        return next(self.loader)

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "loader" not in state:
            raise ConfigError("the checkpoint was written by a run on synthetic data; "
                              "resume it with --data.uri synthetic")
        with _refusals(self.loader.cfg.uri):
            self.loader.load_state_dict(state["loader"])

    def close(self) -> None:
        self.loader.close()


def check_data_config(cfg: JobConfig) -> None:
    """Part of JobConfig validation: the dataset exists and the loader settings are valid."""
    if cfg.data.uri == "synthetic":
        return
    try:
        loader_config(cfg).validate()
    except LoaderConfigError as e:
        raise ConfigError(str(e)) from None
    uri = cfg.data.uri
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://"))
        if not (path / "dataset.json").is_file():
            raise ConfigError(f"data.uri={uri}: no dataset there (no dataset.json); build the demo "
                              f"dataset with `python -m launch.make_dataset --out {uri}` or point "
                              "data.uri at one (or use data.uri=synthetic)")


def build_data(cfg: JobConfig, dp_rank: int, dp: int):
    if cfg.data.uri == "synthetic":
        return SyntheticSource(cfg, dp_rank, dp)
    return LoaderSource(cfg, dp_rank, dp)
