"""A dataset opened from its manifest: sources, shard indexes, tokenizer, checksum.

Opening reads the manifest, the tokenizer and every shard index (small JSON), never a
tar. The checksum covers all of them, so a loader state from another dataset is refused.
Known limit: every process that opens the dataset (each rank's loader, at every start and
resume) parses every index entry into a SampleIndex, ~60 us a sample on a loaded 2-core
machine: seconds to a minute for millions of samples. Building a shard's entries when the
stream first touches it would leave the JSON decoding (~13 us a sample), but a malformed
entry would then surface mid-run instead of skipping its shard at open (the bad-data
policy would have to change).
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


def _parse_manifest(data: bytes, where: str) -> dict:
    """The manifest, or a DatasetError naming the first field that is not what the writer
    (dataloader/shard_writer.py) produces."""
    def bad(field: str, what: str) -> DatasetError:
        return DatasetError(f"{MANIFEST} in {where} is malformed: {field} {what}; rebuild it "
                            "with dataloader.shard_writer (or launch.make_dataset)")

    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise DatasetError(f"{MANIFEST} in {where} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise bad("the top level", f"is a {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT_VERSION:
        raise DatasetError(f"{MANIFEST} in {where} has format {manifest.get('format')!r}; "
                           f"this loader reads {FORMAT_VERSION!r}")
    for field in ("tokenizer", "tokenizer_sha256"):
        if not isinstance(manifest.get(field), str) or not manifest[field]:
            raise bad(f"'{field}'", "is missing or not a non-empty string")
    sources = manifest.get("sources")
    if not isinstance(sources, dict) or not sources:
        raise bad("'sources'", "must be a non-empty object {name: {\"shards\": [...]}}")
    for name, spec in sources.items():
        shards = spec.get("shards") if isinstance(spec, dict) else None
        if not isinstance(shards, list) or not all(isinstance(k, str) and k.endswith(".tar")
                                                   for k in shards):
            raise bad(f"'sources.{name}.shards'", "must be a list of shard keys (<name>.tar)")
    return manifest


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
            manifest_bytes = reader.fresh(MANIFEST)  # never a cached copy: see tiered_reader.py
        except MissingObject as e:
            raise DatasetError(f"no {MANIFEST} in {where}: build a dataset with "
                               "`python -m launch.make_dataset --out DIR` or dataloader.shard_writer") from e
        manifest = _parse_manifest(manifest_bytes, where)
        source_specs = manifest["sources"]
        digest = hashlib.sha256(manifest_bytes)
        self.version = digest.hexdigest()[:16]  # what the node's disk cache keys objects by
        reader.version = self.version
        # cold: the tokenizer is fetched alongside the indexes, not one round trip before them
        reader.prefetch([manifest["tokenizer"]]
                        + [index_key(k) for spec in source_specs.values() for k in spec["shards"]])
        tok_bytes = reader.whole(manifest["tokenizer"])
        if hashlib.sha256(tok_bytes).hexdigest() != manifest["tokenizer_sha256"]:
            raise DatasetError(
                f"{manifest['tokenizer']} in {where} does not match the tokenizer_sha256 of "
                f"{MANIFEST}: the token counts in the shard indexes were made with another "
                "tokenizer. Restore the original tokenizer file or rebuild the dataset")
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
