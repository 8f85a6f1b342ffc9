"""Every op vdopt inserts into graphs: the ``vdopt::`` namespace, one section per family.

Each op has a fake (meta) implementation whose output strides match the real one (a mismatch
breaks a later ``view`` at re-export) and passes ``torch.library.opcheck``. Importing this
module registers the ops; ``vdopt.load`` imports it before loading AOTInductor packages.

Legend: B batch, N heads, S tokens (``Sq`` queries, ``Skv`` keys), D head dim.
"""

from typing import Optional

import torch

from vdopt.kernels.dispatch import attention_forward, attention_fp8_forward, triton_available

# =============================================================================================
# Attention
# =============================================================================================
#
# ``vdopt::attention(q, k, v, scale, key_mask?) -> (out, lse)``
#
# q: (*batch, N, Sq, D), k/v: (*batch, N, Skv, D), any strides; key_mask: bool (*batch, Skv),
# True = attend. out has q's dtype and dimension order (like SDPA, so the transpose+reshape
# after attention stays a view); lse is fp32 (*batch, N, Sq), natural log.
#
# With Triton installed the op is a ``triton_op``: export keeps it as one node, and Inductor /
# AOTInductor trace into its body and compile the Triton kernels it launches. Without Triton
# it is a ``custom_op`` with the same schema running the PyTorch reference, so a graph holds
# the same ``vdopt.attention`` node on every machine.


def _attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from vdopt.kernels.flash_attention import new_lse, new_output

    return new_output(q), new_lse(q)


def _attention_op(name: str, forward):
    """``vdopt::<name>(q, k, v, scale, key_mask?) -> (out, lse)`` computed by ``forward``."""

    def run_triton(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        key_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.library import wrap_triton

        return forward(q, k, v, scale, key_mask, wrap=wrap_triton)

    def run_reference(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        key_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(q, k, v, scale, key_mask)

    if triton_available():
        op = torch.library.triton_op(f"vdopt::{name}", run_triton, mutates_args=())
    else:
        op = torch.library.custom_op(f"vdopt::{name}", run_reference, mutates_args=())
    # An explicit fake: triton_op would otherwise trace its body, which launches the Triton
    # interpreter on fake tensors under TRITON_INTERPRET=1.
    op.register_fake(_attention_fake)
    return op


attention = _attention_op("attention", attention_forward)

# ``vdopt::attention_fp8(q, k, v, scale, key_mask?) -> (out, lse)``: the same contract, with
# Q, K and V quantized to e4m3 (``kernels="fp8"``, approximate: ``kernels/fp8_attention.py``).
attention_fp8 = _attention_op("attention_fp8", attention_fp8_forward)


# =============================================================================================
# Pipeline stages (PipeFusion)
# =============================================================================================
#
# ``vdopt::stage_boundary(values, stage) -> values``: marks where pipeline stage ``stage``
# begins. ``values`` are the activations that cross the boundary; every later use reads the
# marker's outputs, so the marker is live (DCE keeps it) and export keeps it as one node.
# Outputs are copies (a custom op may not return its inputs); the PipeFusion program cuts the
# graph at the markers and never runs them.
#
# ``vdopt::merge_patch_kv(fresh, cache, dim, offset, tail, outer, inner, start) -> merged``:
# the K (or V) of one attention site for a patch of the latent, merged into the K/V of the
# whole latent. Along ``dim`` both tensors are ``[offset | outer x E x inner | tail]`` where E
# is the patched axis (E_full in ``cache``, E_patch in ``fresh``): the result is ``cache``
# with the patch's slot ``start:start+E_patch`` and the unpatched prefix/suffix (text tokens)
# taken from ``fresh``. Contiguous like ``cache.clone()``.


def _stage_boundary_impl(values: list[torch.Tensor], stage: int) -> list[torch.Tensor]:
    return [v.clone() for v in values]


def _stage_boundary_fake(values: list[torch.Tensor], stage: int) -> list[torch.Tensor]:
    return [torch.empty_like(v) for v in values]


stage_boundary = torch.library.custom_op("vdopt::stage_boundary", _stage_boundary_impl, mutates_args=())
stage_boundary.register_fake(_stage_boundary_fake)


def _patch_extent(size: int, offset: int, tail: int, outer: int, inner: int) -> int:
    segment = size - offset - tail
    assert segment >= 0 and segment % (outer * inner) == 0, "patch layout does not match the tensor"
    return segment // (outer * inner)


def _merge_patch_kv_impl(
    fresh: torch.Tensor, cache: torch.Tensor, dim: int, offset: int, tail: int, outer: int, inner: int, start: int
) -> torch.Tensor:
    full = _patch_extent(cache.size(dim), offset, tail, outer, inner)
    part = _patch_extent(fresh.size(dim), offset, tail, outer, inner)
    merged = cache.clone(memory_format=torch.contiguous_format)
    if offset:
        merged.narrow(dim, 0, offset).copy_(fresh.narrow(dim, 0, offset))
    if tail:
        merged.narrow(dim, merged.size(dim) - tail, tail).copy_(fresh.narrow(dim, fresh.size(dim) - tail, tail))
    slot = merged.narrow(dim, offset, outer * full * inner).unflatten(dim, (outer, full, inner))
    patch = fresh.narrow(dim, offset, outer * part * inner).unflatten(dim, (outer, part, inner))
    slot.narrow(dim + 1, start, part).copy_(patch)
    return merged


def _merge_patch_kv_fake(
    fresh: torch.Tensor, cache: torch.Tensor, dim: int, offset: int, tail: int, outer: int, inner: int, start: int
) -> torch.Tensor:
    return torch.empty_like(cache, memory_format=torch.contiguous_format)


merge_patch_kv = torch.library.custom_op("vdopt::merge_patch_kv", _merge_patch_kv_impl, mutates_args=())
merge_patch_kv.register_fake(_merge_patch_kv_fake)


# =============================================================================================
# Ring attention (sequence parallel)
# =============================================================================================
#
# ``vdopt::ring_attention(q, k, v, k_fixed?, v_fixed?, mask?, mask_fixed?, block_lens, scale,
# group_name) -> out``
#
# q: (B, N, Sq, D) this rank's queries; k/v: (B, N, block_lens[rank], D/Dv) this rank's K/V
# block. K/V blocks go around the ring group ``group_name`` with point-to-point sends; partial
# results are merged with their log-sum-exp in fp32 (``vdopt.ring_attention``). k_fixed/v_fixed:
# keys every rank holds in full (joint text tokens), attended once. mask (bool or additive)
# broadcasts to (B, N, Sq, sum(block_lens)) over the ring's keys in rank order; mask_fixed to
# (B, N, Sq, S_fixed). out: (B, N, Sq, Dv), q's dtype, contiguous.


def _ring_attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_fixed: Optional[torch.Tensor],
    v_fixed: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    mask_fixed: Optional[torch.Tensor],
    block_lens: list[int],
    scale: float,
    group_name: str,
) -> torch.Tensor:
    from vdopt.ring_attention import ring_attention_forward

    return ring_attention_forward(q, k, v, k_fixed, v_fixed, mask, mask_fixed, block_lens, scale, group_name)


def _ring_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_fixed: Optional[torch.Tensor],
    v_fixed: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    mask_fixed: Optional[torch.Tensor],
    block_lens: list[int],
    scale: float,
    group_name: str,
) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


ring_attention = torch.library.custom_op("vdopt::ring_attention", _ring_attention_impl, mutates_args=())
ring_attention.register_fake(_ring_attention_fake)


def _ring_attention_setup(ctx, inputs, output) -> None:
    q, k, v, k_fixed, v_fixed, mask, mask_fixed, block_lens, scale, group_name = inputs
    ctx.save_for_backward(q, k, v, k_fixed, v_fixed, mask, mask_fixed)
    ctx.ring = (list(block_lens), scale, group_name)


def _ring_attention_backward(ctx, grad_out):
    # A second ring pass (sequence-parallel training): dK/dV travel back to their owners.
    from vdopt.ring_attention import ring_attention_backward

    grads = ring_attention_backward(grad_out, *ctx.saved_tensors, *ctx.ring)
    return (*grads, None, None, None, None, None)


ring_attention.register_autograd(_ring_attention_backward, setup_context=_ring_attention_setup)
