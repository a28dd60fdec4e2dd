"""A dataset that does not hold together is refused with one line naming what is wrong:
malformed manifest fields, a tokenizer that is not the one the counts were made with, a
shard shorter than its index (in the default shard read mode too)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from dataloader.dataset import DatasetError
from dataloader.loader import build_loader
from dataloader.sample_plan import BadSample
from tests.dataloader.helpers import tiny_config


@pytest.fixture
def copy(demo_dir, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(demo_dir, root)
    return root


def open_loader(root, **kw):
    return build_loader(tiny_config(str(root), **kw), seed=4, dp_rank=0, dp_size=1,
                        rows_per_step=2)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(sources=list(m["sources"].values())), "'sources'"),
    (lambda m: m.pop("tokenizer"), "'tokenizer'"),
    (lambda m: m["sources"]["text"].update(shards="text/shard-00000.tar"), "'sources.text.shards'"),
    (lambda m: m["sources"]["text"]["shards"].append(7), "'sources.text.shards'"),
    (lambda m: m.pop("tokenizer_sha256"), "'tokenizer_sha256'"),
])
def test_malformed_manifest_names_the_field(copy, edit, field):
    manifest = json.loads((copy / "dataset.json").read_text())
    edit(manifest)
    (copy / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=f"dataset.json .* is malformed: {field}"):
        open_loader(copy)


def test_tokenizer_that_does_not_match_its_checksum_is_refused(copy):
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    merges = tokenizer["model"]["merges"]
    tokenizer["model"]["merges"] = merges[:len(merges) // 2]  # what a user once trained on
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(DatasetError, match="tokenizer.json .* does not match the tokenizer_sha256"):
        open_loader(copy)


def test_truncated_shard_is_reported_as_truncated_in_shard_mode(copy):
    for tar in copy.glob("*/shard-*.tar"):
        with open(tar, "r+b") as f:
            f.truncate(os.path.getsize(tar) // 3)
    loader = open_loader(copy, bad_data="fail", read_mode="shard")
    with pytest.raises(BadSample, match="is shorter than its index says"):
        for _ in range(4):
            next(loader)
