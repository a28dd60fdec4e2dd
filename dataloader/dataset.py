"""A dataset opened from its manifest: sources, shard indexes, tokenizer, checksum.

Opening reads the manifest, the tokenizer and every shard index (small JSON), never a
tar. The checksum covers all of them, so a loader state from another dataset is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from dataloader.shard_format import FORMAT_VERSION, MANIFEST, SampleIndex, ShardIndex, index_key
from dataloader.store import MissingObject, StoreError
from dataloader.template import TextTokenizer
from dataloader.tiered_reader import TieredReader

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    pass


@dataclass
class Source:
    name: str
    shards: list[ShardIndex]

    @property
    def shard_sizes(self) -> list[int]:
        return [len(s.samples) for s in self.shards]

    @property
    def num_samples(self) -> int:
        return sum(self.shard_sizes)


class Dataset:
    def __init__(self, reader: TieredReader, *, tokenizer_file: str = "", bad_data: str = "skip"):
        self.reader = reader
        where = reader.store.describe()
        try:
            manifest_bytes = reader.whole(MANIFEST)
        except MissingObject as e:
            raise DatasetError(f"no {MANIFEST} in {where}: build a dataset with "
                               "`python -m launch.make_dataset --out DIR` or dataloader.shard_writer") from e
        try:
            manifest = json.loads(manifest_bytes)
            if manifest.get("format") != FORMAT_VERSION:
                raise DatasetError(f"{MANIFEST} in {where} has format {manifest.get('format')!r}; "
                                   f"this loader reads {FORMAT_VERSION!r}")
            source_specs = manifest["sources"]
        except (ValueError, KeyError) as e:
            raise DatasetError(f"{MANIFEST} in {where} is malformed: {e}") from e
        digest = hashlib.sha256(manifest_bytes)
        tok_bytes = reader.whole(manifest["tokenizer"])
        if tokenizer_file:
            with open(tokenizer_file, "rb") as f:
                own = f.read()
            if hashlib.sha256(own).hexdigest() != hashlib.sha256(tok_bytes).hexdigest():
                raise DatasetError(
                    f"data.tokenizer={tokenizer_file} differs from the tokenizer the dataset's token "
                    "counts were made with; rebuild the shards with it (dataloader.shard_writer "
                    "--tokenizer) or leave data.tokenizer empty")
        self.tokenizer_bytes = tok_bytes
        self.tokenizer = TextTokenizer(data=tok_bytes)
        digest.update(tok_bytes)
        self.sources: list[Source] = []
        self.skipped_shards: list[str] = []
        reader.prefetch([index_key(k) for spec in source_specs.values() for k in spec.get("shards", [])])
        for name, spec in source_specs.items():
            shards = []
            for shard_key in spec["shards"]:
                try:
                    raw = reader.whole(index_key(shard_key))
                    index = ShardIndex.from_bytes(raw, index_key(shard_key))
                except (StoreError, ValueError) as e:
                    if bad_data == "fail":
                        raise DatasetError(f"bad data: shard index {index_key(shard_key)!r}: {e}") from e
                    log.warning("bad data (skipped): shard %s: %s", shard_key, e)
                    self.skipped_shards.append(shard_key)
                    continue
                digest.update(raw)
                shards.append(index)
            if sum(len(s.samples) for s in shards) == 0:
                raise DatasetError(f"source {name!r} in {where} has no readable samples")
            self.sources.append(Source(name, shards))
        self.checksum = digest.hexdigest()[:16]

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def sample(self, source: int, shard: int, local: int) -> SampleIndex:
        return self.sources[source].shards[shard].samples[local]

    def shard_key(self, source: int, shard: int) -> str:
        return self.sources[source].shards[shard].shard
