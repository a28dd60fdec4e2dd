"""Token cross-entropy, summed, so any split of the batch adds up to the same loss.

Labels come already shifted (see dataloader/batch.py). Each microbatch
contributes `sum of its token losses / number of labelled tokens in the global
batch`: summing those contributions over microbatches and data-parallel ranks
gives exactly the mean over the global batch, which is what the single-process
run computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(),
                           labels_BS.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
