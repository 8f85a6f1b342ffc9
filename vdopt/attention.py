"""The public attention entry: validates inputs and runs the registered ``vdopt::attention`` op.

It needs the op (``vdopt.ops``), so it sits at the ops layer, above the kernels; users find
it as ``vdopt.kernels.attention`` (re-exported lazily by ``vdopt.kernels``).
"""

from __future__ import annotations

import math

import torch

from vdopt import ops
from vdopt.kernels.dispatch import unsupported_reason

__all__ = ["attention"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention with ``F.scaled_dot_product_attention``'s layout and meaning (non-causal).

    ``q``: ``(B, N, Sq, D)``, ``k``/``v``: ``(B, N, Skv, D)``, any strides (``(B, S, N, D)``
    views are read in place). A second leading batch dim is accepted too. ``scale`` defaults
    to ``1/sqrt(D)``. ``key_mask``: bool ``(B, Skv)``, True = attend. Returns ``out`` with
    ``q``'s dtype and dimension order, or ``(out, lse)`` with ``return_lse=True``, the fp32
    log-sum-exp ``(B, N, Sq)`` of the scaled scores in natural log (``-inf`` and a zero
    output for rows whose keys are all masked).

    Runs ``torch.ops.vdopt.attention``: Triton kernels on CUDA (and on CPU under
    ``TRITON_INTERPRET=1``), the PyTorch reference elsewhere.
    """
    mask_shape = None if key_mask is None else tuple(key_mask.shape)
    reason = unsupported_reason(
        tuple(q.shape), tuple(k.shape), tuple(v.shape), (q.dtype, k.dtype, v.dtype), mask_shape
    )
    if reason is not None:
        raise ValueError(f"vdopt.kernels.attention does not support these inputs: {reason}")
    if key_mask is not None and key_mask.dtype != torch.bool:
        raise ValueError(f"key_mask must be bool (True = attend), got {key_mask.dtype}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = ops.attention(q, k, v, float(scale), key_mask)
    return (out, lse) if return_lse else out
