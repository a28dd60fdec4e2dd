"""The per-tensor activation model equals what autograd saves in our modules.

Each case runs a module's forward (with the head: given labels, so the chunk computes
its fused loss) under `parallel.activation_memory.SavedTensorBytes` and compares with
`model.activation_bytes`, with the single-process dispatcher (model/dispatcher.py) and
the all-to-all one (parallel/expert_dispatch.py, over a one-rank gloo group). Tolerance
1%: the model leaves out scalars. A mutant model without one entry (the MoE layer's
weighted expert rows, the combine's scatter-add source) must miss by more, so the
tolerance can tell.
"""

import pytest
import torch

from model import activation_bytes as ab
from model.config import preset, replace
from model.init import initialize
from model.lm import ChunkSpec, LanguageModelChunk
from model.vision_language import VisionEncoder
from parallel.activation_memory import SavedTensorBytes
from parallel.expert_dispatch import AllToAllDispatcher

torch.set_num_threads(1)
TOLERANCE = 0.01


def wide():
    cfg = preset("tiny")
    lm = replace(cfg.lm, hidden=384, heads=6, q_lora_rank=128, kv_lora_rank=96,
                 qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=40, dense_hidden=1024,
                 num_experts=8, top_k=2, expert_hidden=192, vocab_size=3000)
    return replace(cfg, lm=lm)


LOCAL = ab.ActivationSpec(dispatcher="local")




def chunk_and_inputs(cfg, chunk: ChunkSpec, batch: int, seq_len: int, media: int = 0,
                     group=None) -> tuple[LanguageModelChunk, tuple]:
    """A seeded chunk (all-to-all dispatcher over `group` if given) and the arguments of one
    forward: token ids or hidden states, positions, several documents per row, `media`
    embeddings, and labels on the chunk with the head (so it computes its fused loss)."""
    torch.manual_seed(0)
    lm = LanguageModelChunk(cfg.lm, chunk)
    initialize(lm, 0)
    for moe in lm.moe_layers() if group is not None else []:
        moe.dispatcher = AllToAllDispatcher(group, cfg.lm.num_experts)
    if chunk.embed:
        x = torch.randint(5, cfg.lm.vocab_size, (batch, seq_len))
    else:
        x = torch.randn(batch, seq_len, cfg.lm.hidden, requires_grad=True)
    positions = torch.arange(seq_len).repeat(batch, 1)
    docs = (torch.arange(seq_len) // 20).repeat(batch, 1)  # several documents per row
    embeds = torch.randn(media, cfg.lm.hidden, requires_grad=True) if media else None
    index = torch.arange(3, 3 + media) if media else None
    labels = torch.randint(0, cfg.lm.vocab_size, (batch, seq_len)) if chunk.head else None
    return lm, (x, positions, docs, embeds, index, labels)


def measured_chunk(cfg, chunk: ChunkSpec, batch: int, seq_len: int, media: int = 0,
                   group=None) -> int:
    lm, inputs = chunk_and_inputs(cfg, chunk, batch, seq_len, media, group)
    with SavedTensorBytes() as saved:
        lm(*inputs)
    return saved.bytes


CHUNKS = [ChunkSpec(False, range(1, 2), False),  # one MoE layer
          ChunkSpec(False, range(0, 1), False),  # the dense layer
          ChunkSpec(True, range(0, 3), True),  # everything
          ChunkSpec(True, range(0, 0), False),  # embedding only
          ChunkSpec(False, range(3, 3), True)]  # head and loss only


@pytest.mark.parametrize("make_cfg", [lambda: preset("tiny"), wide], ids=["tiny", "wide"])
@pytest.mark.parametrize("chunk", CHUNKS, ids=["moe", "dense", "all", "embed", "head"])
@pytest.mark.parametrize("batch, seq_len, media", [(1, 64, 0), (2, 96, 12)])
def test_lm_chunks(make_cfg, chunk, batch, seq_len, media):
    cfg = make_cfg()
    got = measured_chunk(cfg, chunk, batch, seq_len, media if chunk.embed else 0)
    model = ab.total_bytes(ab.lm_chunk(cfg.lm, chunk, batch, seq_len, LOCAL,
                                       media_tokens=media if chunk.embed else 0))
    assert abs(model - got) <= TOLERANCE * got, (got, model)


@pytest.mark.parametrize("batch, seq_len", [(1, 64), (2, 96)])
def test_moe_layer_with_the_all_to_all_dispatcher(one_rank_group, batch, seq_len):
    cfg, chunk = wide(), CHUNKS[0]
    got = measured_chunk(cfg, chunk, batch, seq_len, group=one_rank_group)
    model = ab.total_bytes(ab.lm_chunk(cfg.lm, chunk, batch, seq_len, ab.ActivationSpec()))
    assert abs(model - got) <= TOLERANCE * got, (got, model)
    local = ab.total_bytes(ab.lm_chunk(cfg.lm, chunk, batch, seq_len, LOCAL))
    assert abs(local - got) > TOLERANCE * got  # the all-to-all's ungroup keeps one [R, D] copy more


@pytest.mark.parametrize("make_cfg", [lambda: preset("tiny"), lambda: preset("small")],
                         ids=["tiny", "small"])
@pytest.mark.parametrize("grids", [[(1, 4, 6), (2, 4, 4)], [(1, 8, 8)], [(4, 8, 8), (1, 2, 2)]])
def test_vision_encoder(make_cfg, grids):
    cfg = make_cfg()
    torch.manual_seed(0)
    encoder = VisionEncoder(cfg)
    patches = torch.randn(sum(t * h * w for t, h, w in grids), cfg.vision.patch_dim)
    with SavedTensorBytes() as saved:
        encoder(patches, grids)
    model = ab.total_bytes(ab.vision_encoder(cfg, grids, LOCAL))
    assert abs(model - saved.bytes) <= TOLERANCE * saved.bytes, (saved.bytes, model)


def test_a_model_missing_its_largest_entry_fails():
    cfg = preset("tiny")
    chunk = CHUNKS[0]
    got = measured_chunk(cfg, chunk, 1, 64)
    entries = ab.lm_chunk(cfg.lm, chunk, 1, 64, LOCAL)
    mutant = [e for e in entries if not e.name.endswith("moe.combine.weighted")]
    assert len(mutant) == len(entries) - 1
    assert abs(ab.total_bytes(mutant) - got) > TOLERANCE * got


def test_entries_name_their_module_for_memory_policies():
    cfg = preset("tiny")
    entries = ab.lm_chunk(cfg.lm, ChunkSpec(True, range(0, 2), True), 1, 32, ab.ActivationSpec())
    names = [e.name for e in entries]
    assert len(names) == len(set(names))
    assert "layers.1.moe.experts.gate" in names and "layers.0.attn.probs" in names
    flash = ab.lm_chunk(cfg.lm, ChunkSpec(False, range(0, 1), False), 1, 32,
                        ab.ActivationSpec(compute_bytes=2, attention="flash"))
    assert any(e.name == "layers.0.attn.lse" and e.itemsize == 4 for e in flash)
    assert not any(e.name.endswith("probs") for e in flash)
    assert {e.itemsize for e in flash if e.name.endswith("q_down.out")} == {2}
