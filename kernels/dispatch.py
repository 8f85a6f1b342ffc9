"""Which attention kernel runs for a call, and the checks that decide whether one can.

Legend: B batch, N heads, S tokens (``Sq`` queries, ``Skv`` keys), D head dim.

``attention_forward`` is the body of the ``vdopt::attention`` op: short sequences without a
mask go to the temporal kernel, everything else to the flash kernel. ``attention_fp8_forward``
is the body of ``vdopt::attention_fp8`` (``kernels="fp8"``, approximate). Kernels run on CUDA, and
on CPU only under the Triton interpreter with real tensors; every other case (CPU without the
interpreter, or CPU tracing with fake tensors, where the interpreter cannot read memory) runs
the PyTorch reference, which traces into ordinary ATen ops.
"""

from __future__ import annotations

import importlib.util

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SHORT_SEQ_LEN = 64
"""Sequences up to this length (queries and keys, no mask) use the temporal kernel."""


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def unsupported_reason(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_shape: tuple[int, ...],
    dtypes: tuple[torch.dtype, ...],
    mask_shape: tuple[int, ...] | None = None,
) -> str | None:
    """Why the kernels cannot take these inputs, or None when they can.

    The message starts with a one-word code (``rank``, ``dtype``, ``head_dim``, ``shape``,
    ``gqa``, ``mask_shape``) that the lowering pass counts.

    Shapes are ``(*batch, N, S, D)`` with one or two batch dims; the mask is
    ``(*batch, Skv)``. Used by ``vdopt.kernels.attention`` and the ``sdpa_to_triton`` pass.
    """
    from vdopt.kernels.flash_attention import MAX_HEAD_DIM, MIN_HEAD_DIM

    if len(q_shape) not in (4, 5) or not len(q_shape) == len(k_shape) == len(v_shape):
        return f"rank: q {len(q_shape)}, k {len(k_shape)}, v {len(v_shape)} (want 4 or 5)"
    if len(set(dtypes)) != 1 or dtypes[0] not in SUPPORTED_DTYPES:
        return f"dtype: {sorted({str(d) for d in dtypes})}"
    head_dim = q_shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM or head_dim % 8:
        return f"head_dim: {head_dim} (want a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}])"
    if k_shape != v_shape or k_shape[-1] != head_dim:
        return f"shape: k {k_shape} / v {v_shape} do not match q head dim {head_dim}"
    if q_shape[:-2] != k_shape[:-2]:
        return f"gqa: batch/heads of q {q_shape} and k {k_shape} differ (no GQA support)"
    if mask_shape is not None and tuple(mask_shape) != (*q_shape[:-3], k_shape[-2]):
        return f"mask_shape: {tuple(mask_shape)} is not (*batch, Skv)"
    return None


def kernels_can_run(q: torch.Tensor) -> bool:
    """Whether a Triton kernel (not the reference) should run for ``q``'s device."""
    if not triton_available():
        return False
    if q.device.type == "cuda":
        return True
    from vdopt.kernels.flash_attention import is_interpreted

    # The interpreter reads memory directly, so fake/functional tensors take the reference.
    return q.device.type == "cpu" and is_interpreted() and type(q) is torch.Tensor


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    *,
    wrap=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` for ``(*batch, N, S, D)`` inputs; see ``vdopt.kernels.attention``."""
    from vdopt.kernels.flash_attention import attention_reference, new_lse, new_output

    out = new_output(q)
    lse = new_lse(q)
    if q.numel() == 0:
        return out, lse
    if k.shape[-2] == 0:  # no keys at all: the same answer as all keys masked
        return out.zero_(), lse.fill_(float("-inf"))
    if not kernels_can_run(q):
        ref_out, ref_lse = attention_reference(q, k, v, scale, key_mask)
        return out.copy_(ref_out), lse.copy_(ref_lse)

    # The kernels need a contiguous head dim; every model producer has one already.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if q.device.type != "cuda":
        wrap = None  # interpreter launches are never traced (older torch cannot wrap them)
    sq, skv = q.shape[-2], k.shape[-2]
    if key_mask is None and sq <= SHORT_SEQ_LEN and skv <= SHORT_SEQ_LEN:
        from vdopt.kernels.temporal_attention import temporal_attention_forward

        temporal_attention_forward(q, k, v, out, lse, scale, wrap=wrap)
    else:
        from vdopt.kernels.flash_attention import flash_attention_forward

        flash_attention_forward(q, k, v, out, lse, scale, key_mask, wrap=wrap)
    return out, lse


def attention_fp8_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    *,
    wrap=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` like ``attention_forward``, with Q, K and V in fp8 (``kernels="fp8"``).

    The body of the ``vdopt::attention_fp8`` op. Where no kernel can run (tracing, CPU
    without the interpreter) it computes the same quantization in PyTorch; on a device
    without fp8 tensor cores it raises a ValueError saying what to use instead.
    """
    from vdopt.kernels.flash_attention import new_lse, new_output

    out = new_output(q)
    lse = new_lse(q)
    if q.numel() == 0:
        return out, lse
    if k.shape[-2] == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    from vdopt.kernels.fp8_attention import DEFAULT_PV, check_fp8_device, fp8_attention_forward, fp8_attention_reference

    if not kernels_can_run(q):
        ref_out, ref_lse = fp8_attention_reference(q, k, v, scale, key_mask, pv=DEFAULT_PV)
        return out.copy_(ref_out), lse.copy_(ref_lse)
    check_fp8_device(q.device)
    if q.device.type != "cuda":
        wrap = None
    fp8_attention_forward(q, k, v, out, lse, scale, key_mask, pv=DEFAULT_PV, wrap=wrap)
    return out, lse
