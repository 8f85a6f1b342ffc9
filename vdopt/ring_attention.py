"""Ring attention: the body of the ``vdopt::ring_attention`` op.

Each rank of a ring group holds a block of the queries and the matching block of keys and
values. In ``P`` steps every rank attends its queries to every K/V block: at each step it
computes attention with the block it holds (returning the log-sum-exp of the scores), merges
that partial result into a running fp32 accumulator, and meanwhile sends the block to the next
rank and receives the previous rank's block (``torch.distributed`` point-to-point sends,
overlapped with the compute). Keys every rank already holds in full (``k_fixed``: text tokens
of a joint text+video sequence) are attended once, before the ring, so each is seen exactly
once per query.

Why an op and not functional collectives: functional collectives have no send/recv, and an
all-gather of K/V would move the same bytes but materialize every block at once, losing the
memory bound that is the point of a ring. The op resolves its process group by name, like
functional collectives do, so AOTInductor packages can call it (``vdopt.load`` imports
``vdopt.ops`` first).

Legend: B batch, N heads, Sq queries, Skv keys, D head dim (Dv of the values).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

aten = torch.ops.aten


def _mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _any_valid_key(mask: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    valid = mask if mask.dtype == torch.bool else mask > float("-inf")
    return valid.any(dim=-1).expand(lse.shape)


SCORE_TILE_ELEMENTS = 1 << 26
"""fp32 scores the plain-math path holds at once (256 MiB): a full score matrix at Wan2.1
81x480x832 under ring 2 would be about 13 GB."""


def attention_with_lse(
    q_BNSD: torch.Tensor,
    k_BNSD: torch.Tensor,
    v_BNSD: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of softmax attention; ``lse`` fp32 (B, N, Sq), -inf for rows with no key.

    ``mask`` broadcasts to (B, N, Sq, Skv): bool (True = attend) or additive float.
    """
    if k_BNSD.shape[-2] == 0:
        out = q_BNSD.new_zeros(q_BNSD.shape[:-1] + (v_BNSD.shape[-1],))
        return out, torch.full(q_BNSD.shape[:-1], float("-inf"), device=q_BNSD.device)
    same_head_dim = q_BNSD.shape[-1] == v_BNSD.shape[-1]
    if q_BNSD.device.type == "cpu" and same_head_dim:
        bias = None if mask is None else _mask_bias(mask, q_BNSD.dtype)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q_BNSD, k_BNSD, v_BNSD, 0.0, False, attn_mask=bias, scale=scale
        )
    elif q_BNSD.device.type == "cuda" and same_head_dim:
        out, lse = _cuda_attention_with_lse(q_BNSD, k_BNSD, v_BNSD, mask, scale)
    else:  # other devices, value head dims that differ
        out, lse = blockwise_attention_with_lse(q_BNSD, k_BNSD, v_BNSD, mask, scale)
    if mask is not None:  # a row whose keys are all masked contributes nothing
        valid = _any_valid_key(mask, lse)
        lse = torch.where(valid, lse, float("-inf"))
        out = out.masked_fill(~valid[..., None], 0)
    return out, lse.float()


def _cuda_attention_with_lse(
    q_BNSD: torch.Tensor, k_BNSD: torch.Tensor, v_BNSD: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """vdopt's kernel without a mask where Triton is installed; otherwise SDPA's
    memory-efficient backend, the one that returns the log-sum-exp for every dtype and takes a
    mask; blockwise plain math where that backend refuses the inputs (head dim, alignment)."""
    from vdopt.kernels.dispatch import attention_forward, triton_available

    if mask is None and triton_available():
        return attention_forward(q_BNSD, k_BNSD, v_BNSD, scale)
    bias = None
    if mask is not None:  # an expanded view: the backend reads it with broadcast strides
        bias = _mask_bias(mask, q_BNSD.dtype).expand(*q_BNSD.shape[:-1], k_BNSD.shape[-2])
    try:
        out, lse = aten._scaled_dot_product_efficient_attention(
            q_BNSD, k_BNSD, v_BNSD, bias, True, 0.0, False, scale=scale
        )[:2]
    except RuntimeError:
        return blockwise_attention_with_lse(q_BNSD, k_BNSD, v_BNSD, mask, scale)
    return out, lse[..., : q_BNSD.shape[-2]]  # some versions pad the query dim of the lse


def _tile(mask: torch.Tensor | None, queries: slice, keys: slice) -> torch.Tensor | None:
    if mask is None:
        return None
    return mask[..., queries if mask.shape[-2] > 1 else slice(None), keys if mask.shape[-1] > 1 else slice(None)]


def blockwise_attention_with_lse(
    q_BNSD: torch.Tensor,
    k_BNSD: torch.Tensor,
    v_BNSD: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    *,
    tile_elements: int = SCORE_TILE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 softmax attention over (query chunk x key block) tiles, merged by log-sum-exp, so
    at most about ``tile_elements`` scores exist at once; same contract as ``attention_with_lse``."""
    *batch, sq, _ = q_BNSD.shape
    skv = k_BNSD.shape[-2]
    rows = max(1, math.prod(batch))
    key_block = max(1, min(skv, tile_elements // rows))
    query_chunk = max(1, min(sq, tile_elements // (rows * key_block)))
    outs, lses = [], []
    for q0 in range(0, sq, query_chunk):
        queries = slice(q0, q0 + query_chunk)
        q = q_BNSD[..., queries, :].float()
        acc_out = acc_lse = None
        for k0 in range(0, skv, key_block):
            keys = slice(k0, k0 + key_block)
            scores = torch.matmul(q, k_BNSD[..., keys, :].float().transpose(-1, -2)) * scale
            tile_mask = _tile(mask, queries, keys)
            if tile_mask is not None:
                scores = scores + _mask_bias(tile_mask, torch.float32)
            lse = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
            out = torch.matmul(probs, v_BNSD[..., keys, :].float())
            acc_out, acc_lse = merge_partial(acc_out, acc_lse, out, lse)
        outs.append(acc_out)
        lses.append(acc_lse)
    return torch.cat(outs, dim=-2).to(q_BNSD.dtype), torch.cat(lses, dim=-1)


def merge_partial(
    acc_out: torch.Tensor | None, acc_lse: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial softmax-attention results over disjoint key sets, in fp32."""
    if acc_out is None:
        return out.float(), lse
    new_lse = torch.logaddexp(acc_lse, lse)
    ref = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_acc = torch.exp(acc_lse - ref)[..., None]
    w_new = torch.exp(lse - ref)[..., None]
    return acc_out * w_acc + out.float() * w_new, new_lse


def _key_block(mask: torch.Tensor | None, start: int, length: int) -> torch.Tensor | None:
    if mask is None or mask.shape[-1] == 1:
        return mask
    return mask[..., start:start + length]


def ring_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_fixed: torch.Tensor | None,
    v_fixed: torch.Tensor | None,
    mask: torch.Tensor | None,
    mask_fixed: torch.Tensor | None,
    block_lens: Sequence[int],
    scale: float,
    group_name: str,
    *,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over ``k_fixed`` and every rank's K/V block; see the module doc.

    ``block_lens[i]``: keys of rank ``i``'s block (ranks of the group); ``mask`` covers the
    blocks' keys in rank order (or broadcasts with a key dim of 1), ``mask_fixed`` the fixed keys.
    ``return_lse``: return the fp32 output and log-sum-exp instead (for the backward pass).
    """
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    size, me = dist.get_world_size(group), dist.get_rank(group)
    assert k.shape[-2] == block_lens[me], f"ring block {k.shape[-2]} != block_lens[{me}]={block_lens[me]}"
    offsets = [sum(block_lens[:i]) for i in range(size)]
    acc_out = acc_lse = None
    if k_fixed is not None and k_fixed.shape[-2] > 0:
        acc_out, acc_lse = attention_with_lse(q, k_fixed, v_fixed, mask_fixed, scale)
    # K and V travel as one flat buffer: one send and one receive per step.
    k_shape, v_shape = tuple(k.shape[:-2]), tuple(v.shape[:-2])
    dk, dv = k.shape[-1], v.shape[-1]
    per_key = math.prod(k_shape) * dk, math.prod(v_shape) * dv
    buf = torch.cat([k.reshape(-1), v.reshape(-1)])
    nxt, prv = dist.get_global_rank(group, (me + 1) % size), dist.get_global_rank(group, (me - 1) % size)
    src = me
    for step in range(size):
        reqs, recv = [], None
        if step < size - 1:
            n = block_lens[(src - 1) % size]
            recv = buf.new_empty(n * (per_key[0] + per_key[1]))
            reqs = dist.batch_isend_irecv(
                [dist.P2POp(dist.isend, buf, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
            )
        n = block_lens[src]
        kb = buf[: n * per_key[0]].view(*k_shape, n, dk)
        vb = buf[n * per_key[0]:].view(*v_shape, n, dv)
        out, lse = attention_with_lse(q, kb, vb, _key_block(mask, offsets[src], n), scale)
        acc_out, acc_lse = merge_partial(acc_out, acc_lse, out, lse)
        for r in reqs:
            r.wait()
        if recv is not None:
            buf, src = recv, (src - 1) % size
    if return_lse:
        return acc_out, acc_lse
    return acc_out.to(q.dtype).contiguous()


def ring_bytes_sent(block_lens: Sequence[int], rank: int, key_bytes: int) -> int:
    """Bytes rank ``rank`` sends in one ring pass: every block but the last one it holds."""
    size = len(block_lens)
    return sum(block_lens[(rank - s) % size] for s in range(size - 1)) * key_bytes


# ----------------------------------------------------------------------------- backward


def _block_backward(
    q32: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    lse: torch.Tensor, do32: torch.Tensor, delta: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(dq, dk, dv)`` of one key block, given the softmax's final log-sum-exp over all keys.

    The softmax probabilities of the block are ``exp(scores - lse)``: exactly its share of the
    full softmax, so the per-block gradients sum to the full attention's gradients.
    """
    k32, v32 = k.float(), v.float()
    scores = torch.matmul(q32, k32.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + _mask_bias(mask, torch.float32)
    dead = torch.isinf(lse)[..., None]  # rows with no key at all: output 0, no gradient
    probs = torch.where(dead, 0.0, torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None]))
    dv = torch.matmul(probs.transpose(-1, -2), do32)
    dscores = probs * (torch.matmul(do32, v32.transpose(-1, -2)) - delta[..., None])
    dq = torch.matmul(dscores, k32) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), q32) * scale
    return dq, dk, dv


def ring_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_fixed: torch.Tensor | None,
    v_fixed: torch.Tensor | None,
    mask: torch.Tensor | None,
    mask_fixed: torch.Tensor | None,
    block_lens: Sequence[int],
    scale: float,
    group_name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``ring_attention_forward`` for q, k, v, k_fixed and v_fixed.

    One ring pass recomputes the log-sum-exp (nothing but the inputs is saved), then a second
    pass sends each K/V block around the ring together with the fp32 accumulators of its
    gradients: every rank adds its queries' contribution to the block it holds, and after the
    last step the complete dK/dV of each block travel one more hop, back to its owner. The
    fixed keys' gradients stay local: each rank's queries are the only ones it attends with.
    """
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    size, me = dist.get_world_size(group), dist.get_rank(group)
    out32, lse = ring_attention_forward(
        q, k, v, k_fixed, v_fixed, mask, mask_fixed, block_lens, scale, group_name, return_lse=True
    )
    q32, do32 = q.float(), grad_out.float()
    delta = (do32 * out32).sum(-1)  # rowsum(dO * O), the softmax backward's correction
    offsets = [sum(block_lens[:i]) for i in range(size)]
    dq = torch.zeros_like(q32)
    dk_fixed = dv_fixed = None
    if k_fixed is not None and k_fixed.shape[-2] > 0:
        g_q, g_k, g_v = _block_backward(q32, k_fixed, v_fixed, mask_fixed, lse, do32, delta, scale)
        dq += g_q
        dk_fixed, dv_fixed = g_k.to(k_fixed.dtype), g_v.to(v_fixed.dtype)
    k_shape, v_shape = tuple(k.shape[:-2]), tuple(v.shape[:-2])
    d_k, d_v = k.shape[-1], v.shape[-1]
    per_key = math.prod(k_shape) * d_k, math.prod(v_shape) * d_v
    per = per_key[0] + per_key[1]
    # [k | v] of the block held, and [dk | dv] of the same block (fp32), as flat buffers
    kv = torch.cat([k.reshape(-1), v.reshape(-1)])
    grads = torch.zeros(kv.numel(), dtype=torch.float32, device=q.device)
    nxt, prv = dist.get_global_rank(group, (me + 1) % size), dist.get_global_rank(group, (me - 1) % size)
    src = me
    for step in range(size):
        n = block_lens[src]
        kb = kv[: n * per_key[0]].view(*k_shape, n, d_k)
        vb = kv[n * per_key[0]:].view(*v_shape, n, d_v)
        g_q, g_k, g_v = _block_backward(q32, kb, vb, _key_block(mask, offsets[src], n), lse, do32, delta, scale)
        dq += g_q
        grads += torch.cat([g_k.reshape(-1), g_v.reshape(-1)])
        if size == 1:
            break
        # the last hop carries only the finished gradients, to the block's owner
        m = block_lens[(src - 1) % size]
        send = [grads] if step == size - 1 else [kv, grads]
        recv = [grads.new_empty(m * per)] if step == size - 1 else [kv.new_empty(m * per), grads.new_empty(m * per)]
        ops = [dist.P2POp(dist.isend, t, nxt, group) for t in send] + [dist.P2POp(dist.irecv, t, prv, group) for t in recv]
        for r in dist.batch_isend_irecv(ops):
            r.wait()
        if step == size - 1:
            grads = recv[0]
        else:
            kv, grads = recv
        src = (src - 1) % size
    assert src == me or size == 1, "ring backward ended on another rank's block"
    n = block_lens[me]
    dk = grads[: n * per_key[0]].view(*k_shape, n, d_k).to(k.dtype)
    dv = grads[n * per_key[0]:].view(*v_shape, n, d_v).to(v.dtype)
    return dq.to(q.dtype), dk, dv, dk_fixed, dv_fixed
