"""The batch contract: validation catches each violation; the synthetic generator obeys it."""
import pytest
import torch

from dataloader.batch import IGNORE_INDEX, Batch, MediaItem, merged_tokens
from dataloader.synthetic import SyntheticBatches, SyntheticConfig

MEDIA = 1


def _synthetic(rows=4, seq_len=96):
    data = SyntheticBatches(SyntheticConfig(seq_len=seq_len, vocab_size=512, media_token_id=MEDIA,
                                            patch_dim=588, media_per_seq=2, max_side=6), seed=3)
    return data, data.global_batch(0, rows)


def test_synthetic_batches_obey_the_contract_and_are_deterministic():
    data, batch = _synthetic()
    batch.validate(MEDIA)
    assert batch.media and any(m.grid_thw[0] > 1 for m in data.global_batch(1, 16).media)
    again = data.global_batch(0, 4)
    assert torch.equal(batch.tokens, again.tokens) and torch.equal(batch.labels, again.labels)
    assert not torch.equal(batch.tokens, data.global_batch(1, 4).tokens)
    for m in batch.media:
        assert m.num_tokens == merged_tokens(m.grid_thw)
        assert (batch.tokens[m.row, m.offset:m.offset + m.num_tokens] == MEDIA).all()
    # positions restart for each document
    row = 0
    starts = (batch.doc_ids[row, 1:] != batch.doc_ids[row, :-1]).nonzero().flatten() + 1
    assert all(batch.position_ids[row, int(s)] == 0 for s in starts)


def test_rows_slicing_moves_media():
    _, batch = _synthetic()
    part = batch.rows(2, 4)
    part.validate(MEDIA)
    assert part.num_rows == 2
    assert len(part.media) == sum(1 for m in batch.media if m.row >= 2)


def _minimal():
    tokens = torch.tensor([[2, MEDIA, 3, 5, 0]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX]])
    pos = torch.tensor([[0, 1, 2, 3, 0]])
    docs = torch.tensor([[0, 0, 0, 0, -1]])
    item = MediaItem(0, (1, 2, 2), row=0, offset=1, patches=torch.zeros(4, 588))
    return Batch(tokens, labels, pos, docs, [item])


@pytest.mark.parametrize("breakage, message", [
    (lambda b: setattr(b.media[0], "offset", 2), "not free media placeholder"),
    (lambda b: setattr(b.media[0], "grid_thw", (1, 3, 2)), "even, positive"),
    (lambda b: setattr(b.media[0], "grid_thw", (5, 2, 2)), "1..4 frames"),
    (lambda b: setattr(b.media[0], "patches", torch.zeros(3, 588)), "3 patch rows"),
    (lambda b: b.media.clear(), "no media item fills"),
    (lambda b: b.labels.__setitem__((0, 1), 7), "loss label on a media placeholder"),
    (lambda b: b.labels.__setitem__((0, 0), MEDIA), "predict the media placeholder"),
    (lambda b: setattr(b, "labels", b.labels[:, :4]), "batch.labels has shape"),
])
def test_validation_names_the_violation(breakage, message):
    batch = _minimal()
    batch.validate(MEDIA)
    breakage(batch)
    with pytest.raises(ValueError, match=message):
        batch.validate(MEDIA)
