"""Padding jagged rows to a dense block, for the rows a consumer reads (torch only: no TorchRec).

Dimension letters: N values, B rows, Q chosen rows, L their longest length.
"""

from __future__ import annotations

import torch

__all__ = ["pad_rows"]


def pad_rows(values: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of a jagged ``(values [N, ...], lengths [B])`` pair, padded: ``[Q, L, ...]`` with zeros at padding.

    Example::

        >>> v = torch.tensor([[1.0], [2.0], [3.0]])
        >>> pad_rows(v, torch.tensor([2, 0, 1]), torch.tensor([2, 0]))[..., 0].tolist()
        [[3.0, 0.0], [1.0, 2.0]]
    """
    offsets = torch.cumsum(lengths, 0) - lengths  # (B,)
    if rows is not None:
        offsets, lengths = offsets[rows], lengths[rows]
    Q = lengths.shape[0]
    L = int(lengths.max()) if Q else 0
    steps = torch.arange(L, device=values.device)
    valid = steps[None, :] < lengths[:, None]  # (Q, L)
    if values.shape[0] == 0:
        return values.new_zeros(Q, L, *values.shape[1:])
    index = (offsets[:, None] + steps[None, :]).clamp(max=values.shape[0] - 1)  # (Q, L)
    out = values[index]  # (Q, L, ...)
    return out * valid.view(Q, L, *([1] * (values.dim() - 1))).to(out.dtype)
