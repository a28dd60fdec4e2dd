"""DEP's data path on a real dataset (the tiny demo, through the streaming loader):

- every rank decodes exactly the media items the DEP plan assigns to it, each item is
  decoded by one rank only, and no pixels travel between ranks (only embeddings);
  with the encoder colocated, only pipeline stage 0 decodes, exactly its replica's items;
  a mutant that decodes everything on every rank fails the same check;
- a rank whose loader diverged (seeded differently) is caught by the DEP digest check
  before any other DEP collective, with both digests in the error, instead of hanging
  or training on mismatched data.
"""
import json
import re

import pytest

from tests.distributed.launcher import torchrun

pytestmark = pytest.mark.slow

BASE = ["--config", "configs/tiny.toml", "--train.global_batch", "8", "--data.seq_len", "96",
        "--data.max_patches_per_image", "64"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from launch.make_dataset import build
    from tests.dataloader.conftest import TINY

    out = str(tmp_path_factory.mktemp("demo"))
    build(out, **TINY)
    return out


def launch(tmp_path, dataset, layouts, *extra, steps=2):
    out = tmp_path / "records.json"
    torchrun("tests.distributed.dep_data_worker", 4, "--out", str(out), "--layouts", ";".join(layouts),
             "--steps", str(steps), "--base", " ".join(BASE + ["--data.uri", dataset]), *extra)
    return json.loads(out.read_text())


def dep_problems(ranks: list[list[dict]]) -> list[str]:
    problems = []
    for step in range(len(ranks[0])):
        records = [r[step] for r in ranks]
        everything = sorted(i for r in records if r["stage"] == 0 for i in r["own_items"])
        decoded = sorted(i for r in records for i in r["decoded"])
        if decoded != everything:
            problems.append(f"step {step}: the ranks decoded {len(decoded)} items, the step has "
                            f"{len(everything)} (each must be decoded exactly once)")
        for rank, r in enumerate(records):
            if r["decoded"] != r["assigned"]:
                problems.append(f"step {step} rank {rank}: decoded {r['decoded']}, "
                                f"the plan assigned {r['assigned']}")
            if r["group_items"] != everything:
                problems.append(f"step {step} rank {rank}: derived other media metadata")
    return problems


def test_each_rank_decodes_exactly_its_assigned_items(tmp_path, dataset):
    dep = ["pp=2,dp=2,encoder=dep", "pp=2,vpp=2,ep=2,dp=2,encoder=dep"]
    colocated, mutant = "pp=2,dp=2,encoder=colocated", "pp=2,dp=2,encoder=dep,mutant=decode_all"
    results = launch(tmp_path, dataset, dep + [colocated, mutant])
    for layout in dep:
        ranks = results[layout]
        assert not dep_problems(ranks), f"{layout}: " + "; ".join(dep_problems(ranks)[:6])
        assert any(r["decoded"] for rank in ranks for r in rank), "the data should have media"
        assert any(r["decoded"] for rank in ranks for r in rank if r["stage"] == 1), \
            "DEP should give stage-1 ranks media to encode"
        # what crosses ranks is embeddings (hidden 64 floats per merged token), never pixels
        assert all(r["embedding_bytes_sent"] % (64 * 4) == 0 for rank in ranks for r in rank)
    for rank in results[colocated]:
        for r in rank:
            want = r["own_items"] if r["stage"] == 0 else []
            assert r["decoded"] == want, f"colocated stage {r['stage']} decoded {r['decoded']}"
            assert r["stage"] == 0 or r["pixel_bytes"] == 0
    assert dep_problems(results[mutant]), "the mutant that decodes everything went unnoticed"


def test_a_rank_whose_data_diverged_is_caught_by_the_digest_check(tmp_path, dataset):
    with pytest.raises(AssertionError) as failure:
        launch(tmp_path, dataset, ["pp=2,dp=2,encoder=dep"], "--forge-rank", "3", steps=1)
    log = str(failure.value)
    found = re.findall(r"DEP plan mismatch on rank (\d+): this rank's plan digest is ([0-9a-f]{64}), "
                       r"but ((?:rank \d+ has [0-9a-f]{64}(?:; )?)+)", log)
    assert found, log[-3000:]
    for rank, mine, others in found:
        theirs = re.findall(r"rank (\d+) has ([0-9a-f]{64})", others)
        assert theirs and all(digest != mine for _, digest in theirs)
    # torchrun stops the other ranks once the first one fails, so which ranks get to print
    # is a race: what every report must show is the same split, rank 3 against the rest
    digest_of = {}
    for rank, mine, others in found:
        for r, digest in [(rank, mine)] + re.findall(r"rank (\d+) has ([0-9a-f]{64})", others):
            assert digest_of.setdefault(r, digest) == digest, f"rank {r} reported two digests"
    assert "3" in digest_of, "the diverged rank must be named"
    agreeing = {digest for r, digest in digest_of.items() if r != "3"}
    assert len(agreeing) == 1 and digest_of["3"] not in agreeing, digest_of
