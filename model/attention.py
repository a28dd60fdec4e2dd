"""Attention over packed sequences: one interface per masking rule, the kernel chosen here.

    LM rows     several documents per row, causal within each   `document_attention`
    media       several items packed in one sequence, full      `segment_attention`
                attention within each item

Kernels, picked per call from the tensors (so the same model code runs everywhere):

    CUDA, bf16/fp16   varlen flash attention (`torch.nn.attention.varlen.varlen_attn`) over
                      the segments: no S x S mask, memory O(tokens)
    otherwise         torch SDPA: LM rows with the dense [B, 1, S, S] document mask (the
                      fp32 reference: every distributed layout and the golden files are
                      checked against it); media items grouped by length, one batched call
                      per distinct length (no Python loop per item)
    `te=True`         transformer-engine's fused attention (model/te_kernels.py), CUDA only

Both masks come from data computed ONCE per forward and shared by every layer
(`DocumentMask`): the dense mask or the segment boundaries, whichever the kernel needs.

Known limits: the varlen kernel needs one head dim for q, k and v, so MLA's values
(128) are zero-padded to the query/key dim (192) and the output sliced back (about 20%
more work in p.v); documents must be contiguous runs of one doc id in a row (the
loader packs them so; the dense mask would also accept scattered ids).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def packed_causal_mask(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool: position i may attend to j <= i of the same document.

    Padding (doc -1) attends to earlier padding only, so no row is empty (an
    empty row would make softmax NaN and poison gradients).
    """
    S = doc_ids_BS.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids_BS.device).tril()
    same_doc = doc_ids_BS.unsqueeze(2) == doc_ids_BS.unsqueeze(1)
    return (same_doc & causal).unsqueeze(1)


def _varlen_available(x: torch.Tensor) -> bool:
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class DocumentMask:
    """The packed rows' documents, in the forms the kernels want (each built on first use)."""

    doc_ids_BS: torch.Tensor
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _segments: tuple[torch.Tensor, int] | None = field(default=None, repr=False)

    @property
    def dense_B1SS(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = packed_causal_mask(self.doc_ids_BS)
        return self._dense

    @property
    def segments(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens int32 [n+1] over the flattened B*S tokens, longest segment): a segment
        is a maximal run of one doc id inside a row. One host sync (the longest length)."""
        if self._segments is None:
            B, S = self.doc_ids_BS.shape
            flat = self.doc_ids_BS.reshape(-1)
            starts = torch.ones_like(flat, dtype=torch.bool)
            starts[1:] = flat[1:] != flat[:-1]
            starts[::S] = True  # every row starts a segment
            begin = starts.nonzero().squeeze(1)
            cu = torch.cat([begin, begin.new_tensor([B * S])]).to(torch.int32)
            self._segments = (cu, int((cu[1:] - cu[:-1]).max()))
        return self._segments


def document_attention(q_BHSQ: torch.Tensor, k_BHSQ: torch.Tensor, v_BHSV: torch.Tensor,
                       mask: DocumentMask, scale: float, te: bool = False) -> torch.Tensor:
    """Causal attention within each document of each row: [B, H, S, V]."""
    if te and q_BHSQ.is_cuda:
        from model import te_kernels
        return te_kernels.document_attention(q_BHSQ, k_BHSQ, v_BHSV, *mask.segments, scale)
    if not _varlen_available(q_BHSQ):
        return F.scaled_dot_product_attention(q_BHSQ, k_BHSQ, v_BHSV, attn_mask=mask.dense_B1SS,
                                              scale=scale)
    from torch.nn.attention.varlen import varlen_attn

    B, H, S, Q = q_BHSQ.shape
    V = v_BHSV.shape[-1]
    cu, longest = mask.segments
    q, k, v = (t.transpose(1, 2).reshape(B * S, H, t.shape[-1]) for t in (q_BHSQ, k_BHSQ, v_BHSV))
    if V != Q:  # the kernel wants one head dim: pad v, slice the output back
        v = F.pad(v, (0, Q - V))
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, window_size=(-1, 0))
    return out[..., :V].reshape(B, S, H, V).transpose(1, 2)


def segment_attention(q_NHD: torch.Tensor, k_NHD: torch.Tensor, v_NHD: torch.Tensor,
                      lengths: list[int], te: bool = False) -> torch.Tensor:
    """Full attention inside each segment of a packed sequence (segment i has lengths[i]
    tokens, in order): [N, H, D], equal to one attention call per segment."""
    total = sum(lengths)
    if total != q_NHD.shape[0] or any(n < 0 for n in lengths):
        raise ValueError(f"segment lengths {lengths} must be >= 0 and sum to the sequence "
                         f"length {q_NHD.shape[0]}")
    if total == 0:
        return v_NHD[:0]
    if (te and q_NHD.is_cuda) or _varlen_available(q_NHD):
        cu = torch.tensor([0, *lengths], dtype=torch.int64, device=q_NHD.device).cumsum(0)
        cu = cu.to(torch.int32)
        if te:
            from model import te_kernels
            return te_kernels.segment_attention(q_NHD, k_NHD, v_NHD, cu, max(lengths))
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn(q_NHD, k_NHD, v_NHD, cu, cu, max(lengths), max(lengths))
    # one batched SDPA per distinct segment length: segments of equal length stack exactly
    starts = torch.tensor([0, *lengths[:-1]], device=q_NHD.device).cumsum(0)
    lengths_t = torch.tensor(lengths, device=q_NHD.device)
    all_rows, outputs = [], []
    for length in sorted(set(lengths) - {0}):
        rows = (starts[lengths_t == length].unsqueeze(1)
                + torch.arange(length, device=q_NHD.device)).reshape(-1)
        q, k, v = (t[rows].unflatten(0, (-1, length)).transpose(1, 2)
                   for t in (q_NHD, k_NHD, v_NHD))
        outputs.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(0, 1))
        all_rows.append(rows)
    return torch.empty_like(v_NHD).index_copy(0, torch.cat(all_rows), torch.cat(outputs))
