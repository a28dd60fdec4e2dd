"""Loader configuration: every field a plain scalar so the job config can expose it as
`--data.<field>`.

Fields split in two groups. The *stream* fields decide which tokens end up in which
row of which step; they enter `stream_checksum()` and a saved state refuses to load
into a loader whose stream fields differ. The *execution* fields (workers, prefetch,
caches, request budget, retries) change only how fast the same stream is produced, so
they may change between a save and a resume.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields


class LoaderConfigError(ValueError):
    """An invalid loader setting; the message names the field and what to change."""


@dataclass
class LoaderConfig:
    # --- where the data lives ---------------------------------------------------------
    uri: str = ""  # local directory, file://DIR, or s3://bucket/prefix
    s3_endpoint_url: str = ""  # any S3-compatible store; empty: AWS default resolution
    s3_region: str = ""  # empty: the standard chain (AWS_REGION, config files)

    # --- stream fields (in the checksum) ----------------------------------------------
    seq_len: int = 512  # tokens per packed row
    blend: str = ""  # "" = all sources by size; "a:0.7,b:0.3" or "0:a:0.7,b:0.3;5000:a:0.2,b:0.8"
    shuffle: bool = True  # shuffle shards, then windows of samples
    shuffle_window: int = 256  # samples permuted together; reads stay within ~2 shards
    pack_buffer: int = 64  # samples the best-fit packer chooses from
    max_media_per_row: int = 16  # cap on media items (images / video chunks) per packed row
    max_patches_per_image: int = 256  # cap on 14x14 patches of one image or video frame
    max_video_frames: int = 8  # frames sampled from a video (then cut into chunks of 4)
    augment: bool = True  # random crop, flip, resize and colour jitter of images
    aug_min_crop_area: float = 0.6  # random crop keeps at least this fraction of the area
    aug_flip_prob: float = 0.5  # probability of a horizontal flip (boxes and points follow)
    aug_min_scale: float = 0.75  # random resize factor in [aug_min_scale, 1]
    aug_color_jitter: float = 0.1  # brightness/contrast/saturation jitter strength
    tokenizer: str = ""  # "" = the tokenizer stored with the dataset
    bad_data: str = "skip"  # "skip" (count, log the key, pad the hole) or "fail"

    # --- execution fields (not in the checksum) ---------------------------------------
    workers: int = 0  # loader worker processes; 0 = decode in the calling process
    prefetch: int = 2  # steps materialised ahead of the consumer
    worker_start_method: str = "forkserver"  # forkserver | spawn | fork (fork can deadlock in threaded parents)
    read_mode: str = "shard"  # "shard": whole-shard GETs (sequential); "range": per-sample GETs
    memory_cache_mb: int = 256  # per process
    disk_cache_dir: str = ""  # node-local; "" = a folder under the system temp dir
    disk_cache_mb: int = 4096  # per node
    requests_per_s: float = 100.0  # per node, shared by all workers of the node
    max_concurrent_requests: int = 8  # per node
    max_retries: int = 8  # retries of a throttled or reset request before failing
    retry_base_s: float = 0.05  # first retry backoff (doubles, with jitter)
    retry_max_s: float = 2.0  # longest retry backoff
    request_timeout_s: float = 20.0  # connect and read timeout of one S3 request
    retry_deadline_s: float = 60.0  # no S3 retry starts later than this after the first attempt

    _STREAM_FIELDS = (
        "seq_len", "blend", "shuffle", "shuffle_window", "pack_buffer", "max_media_per_row",
        "max_patches_per_image", "max_video_frames", "augment", "aug_min_crop_area",
        "aug_flip_prob", "aug_min_scale", "aug_color_jitter", "tokenizer", "bad_data",
    )

    def validate(self) -> None:
        if not self.uri:
            raise LoaderConfigError("data.uri is empty: give a dataset directory or s3://bucket/prefix "
                                    "(build the demo with `python -m launch.make_dataset --out DIR`)")
        positive = ("seq_len", "shuffle_window", "pack_buffer", "max_media_per_row",
                    "max_patches_per_image", "max_video_frames", "prefetch", "max_concurrent_requests")
        for name in positive:
            if getattr(self, name) <= 0:
                raise LoaderConfigError(f"data.{name}={getattr(self, name)} must be positive")
        if self.max_patches_per_image < 4:
            raise LoaderConfigError("data.max_patches_per_image must be at least 4 (one 2x2 merge)")
        if self.workers < 0:
            raise LoaderConfigError(f"data.workers={self.workers} must be >= 0")
        if self.bad_data not in ("skip", "fail"):
            raise LoaderConfigError(f"data.bad_data={self.bad_data!r}: use 'skip' or 'fail'")
        if self.read_mode not in ("shard", "range"):
            raise LoaderConfigError(f"data.read_mode={self.read_mode!r}: use 'shard' or 'range'")
        if self.worker_start_method not in ("fork", "spawn", "forkserver"):
            raise LoaderConfigError(f"data.worker_start_method={self.worker_start_method!r}: "
                                    "use fork, spawn or forkserver")
        if not 0.0 < self.aug_min_crop_area <= 1.0:
            raise LoaderConfigError("data.aug_min_crop_area must be in (0, 1]")
        if not 0.0 < self.aug_min_scale <= 1.0:
            raise LoaderConfigError("data.aug_min_scale must be in (0, 1]")
        if not 0.0 <= self.aug_flip_prob <= 1.0:
            raise LoaderConfigError("data.aug_flip_prob must be in [0, 1]")
        if self.requests_per_s <= 0:
            raise LoaderConfigError("data.requests_per_s must be positive")
        if self.max_retries < 0:
            raise LoaderConfigError("data.max_retries must be >= 0")
        if self.request_timeout_s <= 0 or self.retry_deadline_s < 0:
            raise LoaderConfigError("data.request_timeout_s must be positive and "
                                    "data.retry_deadline_s >= 0")

    @property
    def steps_decoded_ahead(self) -> int:
        """Steps whose rows and media the loader has handed to its workers beyond the one it
        returns: `prefetch` with workers, none without (the calling process materialises a
        step when it is asked for it). Their pixels exist, uint8, while a step trains; the
        planner (trainer/planner.py) counts them."""
        return self.prefetch if self.workers > 0 else 0

    def stream_checksum(self) -> str:
        stream = {name: getattr(self, name) for name in self._STREAM_FIELDS}
        return hashlib.sha256(json.dumps(stream, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


__all__ = ["LoaderConfig", "LoaderConfigError", "asdict"]
