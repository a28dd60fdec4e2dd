"""Token cross-entropy, summed, so any split of the batch adds up to the same loss.

Labels come already shifted (see dataloader/batch.py). Each microbatch
contributes `sum of its token losses / number of labelled tokens in the global
batch`: summing those contributions over microbatches and data-parallel ranks
gives exactly the mean over the global batch, which is what the single-process
run computes.

`linear_cross_entropy_sum` fuses the head projection with the loss and works through
the tokens in chunks, so the fp32 logits of a whole microbatch ([B*S, V]: 2.7 GB for
K2.5 at S=4096, V=163840) never exist at once: per chunk it computes the logits, the
loss and the gradient of the logits (softmax - one-hot), turns that into the
gradients of the hidden states and of the head weight, and drops the logits. The
backward only scales those stored gradients. Memory: one chunk of logits plus one
head-weight-sized fp32 gradient, instead of the microbatch's logits and their softmax.
Under a memory policy that recomputes the head (region "head.loss", model/memory_policy.py)
the forward computes the loss only and the recomputation in the backward the gradients,
so nothing head-sized is kept between the two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.saved_tensors import first_run_of_recomputed_region

IGNORE_INDEX = -100
CHUNK_LOGIT_BYTES = 256 << 20  # fp32 logits of one chunk


def cross_entropy_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """The unfused reference (for tests and logits-returning callers)."""
    return F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(),
                           labels_BS.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, labels_N, rows_per_chunk: int):
        ctx.weight_dtype = weight_VD.dtype
        if first_run_of_recomputed_region():  # the gradients are made in the recomputation
            # as many (empty) tensors as the recomputation saves: checkpoint matches them up
            ctx.save_for_backward(*[hidden_ND.new_empty(0) if need else None
                                    for need in ctx.needs_input_grad[:2]])
            return _loss_and_grads(hidden_ND, weight_VD, labels_N, rows_per_chunk, False, False)[0]
        loss, grad_hidden, grad_weight = _loss_and_grads(
            hidden_ND, weight_VD, labels_N, rows_per_chunk, ctx.needs_input_grad[0],
            ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype),
                None, None)


def _loss_and_grads(hidden_ND, weight_VD, labels_N, rows_per_chunk: int, want_hidden: bool,
                    want_weight: bool):
    """The summed loss and, if wanted, the gradients of the hidden states and the fp32
    gradient of the weight, chunk by chunk."""
    want_grad = want_hidden or want_weight
    loss = torch.zeros((), dtype=torch.float32, device=hidden_ND.device)
    grad_hidden = torch.empty_like(hidden_ND) if want_hidden else None
    grad_weight = (torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device)
                   if want_weight else None)
    for start in range(0, hidden_ND.shape[0], rows_per_chunk):
        hidden = hidden_ND[start:start + rows_per_chunk]
        labels = labels_N[start:start + rows_per_chunk]
        logits_nV = (hidden @ weight_VD.t()).float()
        valid = labels != IGNORE_INDEX
        target = torch.where(valid, labels, 0).unsqueeze(1)
        log_z = torch.logsumexp(logits_nV, dim=-1)
        loss += torch.where(valid, log_z - logits_nV.gather(1, target).squeeze(1), 0.0).sum()
        if not want_grad:
            continue
        grad_logits = torch.exp(logits_nV - log_z.unsqueeze(1))  # softmax
        grad_logits.scatter_add_(1, target, torch.full_like(log_z, -1.0).unsqueeze(1))
        grad_logits = (grad_logits * valid.unsqueeze(1)).to(hidden.dtype)
        if grad_hidden is not None:
            grad_hidden[start:start + rows_per_chunk] = grad_logits @ weight_VD
        if grad_weight is not None:
            grad_weight += (grad_logits.t() @ hidden).float()
    return loss, grad_hidden, grad_weight


def linear_cross_entropy_sum(hidden_BSD: torch.Tensor, weight_VD: torch.Tensor,
                             labels_BS: torch.Tensor,
                             chunk_logit_bytes: int = CHUNK_LOGIT_BYTES) -> torch.Tensor:
    """sum over labelled tokens of cross_entropy(hidden @ weight^T, label), fp32, chunked."""
    rows = max(1, chunk_logit_bytes // (4 * weight_VD.shape[0]))
    return _LinearCrossEntropy.apply(hidden_BSD.reshape(-1, hidden_BSD.shape[-1]), weight_VD,
                                     labels_BS.reshape(-1), rows)
