"""Short-sequence attention (temporal attention): thousands of sequences of 8-64 tokens.

Legend: B batch (one or two leading dims, ``B1 x B2``), N heads, S tokens (frames), D head
dim, G the (batch, head) pairs one program handles.

Temporal attention in video DiTs attends over the T frames of every spatial position:
``B*H*W`` sequences of 16-30 tokens. Each sequence is a few KB, so a flash kernel with one
sequence per program spends its time on launch granularity and half-empty tiles. Here one
program loads ``G`` whole sequences as ``(G, S, D)`` tiles (batched ``tl.dot``), does an
exact softmax in registers (no online rescaling: the whole key set fits), and writes the
output and LSE. It is memory-bound: the goal is bytes moved / 3 TB/s on H100.

Pairs are numbered ``(b, n)`` with heads fastest, so for the ``(B, S, N, D)`` token layout the
G heads of one token that a program reads are adjacent in memory. Inputs are read through
their strides, with one or two batch dims: a ``(B, HW, N, T, D)`` view of a ``(B, T, HW, C)``
latent is read in place, which is what lets the permutes around temporal attention go away.
The head dim uses the same power-of-two main + tail split as the long-sequence kernel.
"""

from __future__ import annotations

import functools

import torch

from vdopt.kernels.flash_attention import (
    LOG2E,
    attention_reference,
    batch_strides,
    dot_precision,
    head_dim_split,
    is_interpreted,
    triton,
)

if triton is not None:
    import triton.language as tl

    from vdopt.kernels.flash_attention import _max, _sum  # builtins-only reductions (see there)

__all__ = ["MAX_SEQ_LEN", "attention_reference", "temporal_attention_forward"]

MAX_SEQ_LEN = 64
"""Longest query/key sequence this kernel takes (the whole sequence lives in registers)."""


def seq_pad(length: int) -> int:
    """Padded tile length: a power of two, at least 16 (the smallest MMA M/N)."""
    return max(16, triton.next_power_of_2(length))


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load_seqs(base, offs_pair_elems, ok_pair, offs_s, n_s, stride_s, offs_d, HEAD_DIM: tl.constexpr,
                   MASK_COLS: tl.constexpr):
        """A ``(G, S_PAD, D_part)`` tile of G sequences; out-of-range rows/pairs read 0."""
        ptrs = base + offs_pair_elems[:, None, None] + offs_s[None, :, None] * stride_s + offs_d[None, None, :]
        mask = ok_pair[:, None, None] & (offs_s < n_s)[None, :, None]
        if MASK_COLS:
            mask = mask & (offs_d < HEAD_DIM)[None, None, :]
        return tl.load(ptrs, mask=mask, other=0.0)

    @triton.jit
    def _store_seqs(base, offs_pair_elems, ok_pair, offs_s, n_s, stride_s, offs_d, value,
                    HEAD_DIM: tl.constexpr, MASK_COLS: tl.constexpr):
        ptrs = base + offs_pair_elems[:, None, None] + offs_s[None, :, None] * stride_s + offs_d[None, None, :]
        mask = ok_pair[:, None, None] & (offs_s < n_s)[None, :, None]
        if MASK_COLS:
            mask = mask & (offs_d < HEAD_DIM)[None, None, :]
        tl.store(ptrs, value, mask=mask)

    @triton.jit
    def temporal_attention_kernel(
        Q, K, V, O, LSE, qk_scale,
        sq_b1, sq_b2, sq_n, sq_s, sk_b1, sk_b2, sk_n, sk_s, sv_b1, sv_b2, sv_n, sv_s,
        so_b1, so_b2, so_n, so_s,
        B2, N, num_pairs, Sq, Skv,
        HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr,
        MASK_COLS: tl.constexpr, MASK_MAIN: tl.constexpr, SQ_PAD: tl.constexpr, SKV_PAD: tl.constexpr,
        PRECISION: tl.constexpr, PAIRS: tl.constexpr,
    ):
        pair = tl.program_id(0) * PAIRS + tl.arange(0, PAIRS)
        ok_pair = pair < num_pairs
        n = (pair % N).to(tl.int64)
        b = pair // N
        b1 = (b // B2).to(tl.int64)
        b2 = (b % B2).to(tl.int64)
        q_off = b1 * sq_b1 + b2 * sq_b2 + n * sq_n
        k_off = b1 * sk_b1 + b2 * sk_b2 + n * sk_n
        v_off = b1 * sv_b1 + b2 * sv_b2 + n * sv_n
        o_off = b1 * so_b1 + b2 * so_b2 + n * so_n
        offs_q = tl.arange(0, SQ_PAD)
        offs_k = tl.arange(0, SKV_PAD)
        offs_d0 = tl.arange(0, D0)
        offs_d1 = D0 + tl.arange(0, D1)

        q0 = _load_seqs(Q, q_off, ok_pair, offs_q, Sq, sq_s, offs_d0, HEAD_DIM, MASK_MAIN)
        k0 = _load_seqs(K, k_off, ok_pair, offs_k, Skv, sk_s, offs_d0, HEAD_DIM, MASK_MAIN)
        scores = tl.dot(q0, tl.permute(k0, (0, 2, 1)), input_precision=PRECISION)
        if HAS_TAIL:
            q1 = _load_seqs(Q, q_off, ok_pair, offs_q, Sq, sq_s, offs_d1, HEAD_DIM, MASK_COLS)
            k1 = _load_seqs(K, k_off, ok_pair, offs_k, Skv, sk_s, offs_d1, HEAD_DIM, MASK_COLS)
            scores = tl.dot(q1, tl.permute(k1, (0, 2, 1)), scores, input_precision=PRECISION)
        # Exact softmax over the whole (short) key set, base 2 with the scale folded in.
        scores = tl.where((offs_k < Skv)[None, None, :], scores * qk_scale, float("-inf"))
        m = _max(scores, 2)
        p = tl.math.exp2(scores - m[:, :, None])
        l = _sum(p, 2)
        inv_l = 1.0 / l
        p = p.to(Q.dtype.element_ty)

        v0 = _load_seqs(V, v_off, ok_pair, offs_k, Skv, sv_s, offs_d0, HEAD_DIM, MASK_MAIN)
        out0 = tl.dot(p, v0, input_precision=PRECISION) * inv_l[:, :, None]
        _store_seqs(O, o_off, ok_pair, offs_q, Sq, so_s, offs_d0, out0.to(O.dtype.element_ty), HEAD_DIM, MASK_MAIN)
        if HAS_TAIL:
            v1 = _load_seqs(V, v_off, ok_pair, offs_k, Skv, sv_s, offs_d1, HEAD_DIM, MASK_COLS)
            out1 = tl.dot(p, v1, input_precision=PRECISION) * inv_l[:, :, None]
            _store_seqs(O, o_off, ok_pair, offs_q, Sq, so_s, offs_d1, out1.to(O.dtype.element_ty),
                        HEAD_DIM, MASK_COLS)

        lse = (m + tl.math.log2(l)) * 0.6931471805599453
        lse_ptrs = LSE + pair.to(tl.int64)[:, None] * Sq + offs_q[None, :]
        tl.store(lse_ptrs, lse, mask=ok_pair[:, None] & (offs_q < Sq)[None, :])


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------

# Rows per program (PAIRS * SQ_PAD) of 128 keep the interpreter's numpy blocks large.
INTERPRETER_ROWS = 128


@functools.cache
def _autotuned_kernel(sq_pad: int):
    # 64-256 query rows per program (PAIRS * SQ_PAD) and 2-8 warps: a memory-bound kernel
    # wants several programs resident per SM, so the small tiles stay in the list. Filtering
    # here rather than with prune_configs_by keeps the autotuner traceable by Inductor.
    configs = [
        triton.Config({"PAIRS": pairs}, num_warps=warps, num_stages=1)
        for pairs in (1, 2, 4, 8, 16)
        if 64 <= pairs * sq_pad <= 256
        for warps in (2, 4, 8)
    ]
    return triton.autotune(configs, key=["Sq", "Skv", "HEAD_DIM"])(temporal_attention_kernel)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def temporal_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    *,
    wrap=None,
    pairs: int | None = None,
) -> None:
    """Launch the short-sequence kernel, writing ``out`` and ``lse`` in place.

    Shapes as for ``flash_attention_forward`` (no key mask), with ``Sq, Skv <= MAX_SEQ_LEN``.
    ``pairs`` pins the (batch, head) pairs per program instead of autotuning.
    """
    assert triton is not None, "temporal_attention_forward needs Triton"
    for t in (q, k, v, out):
        assert t.stride(-1) == 1, "the head dim must be contiguous"
    *_, n_heads, sq, head_dim = q.shape
    skv = k.shape[-2]
    assert sq <= MAX_SEQ_LEN and skv <= MAX_SEQ_LEN, (sq, skv)
    d0, d1 = head_dim_split(head_dim)
    b2, sq_b1, sq_b2 = batch_strides(q, 3)
    _, sk_b1, sk_b2 = batch_strides(k, 3)
    _, sv_b1, sv_b2 = batch_strides(v, 3)
    _, so_b1, so_b2 = batch_strides(out, 3)
    num_pairs = q.numel() // (sq * head_dim) if q.numel() else 0
    args = (
        q, k, v, out, lse, scale * LOG2E,
        sq_b1, sq_b2, q.stride(-3), q.stride(-2),
        sk_b1, sk_b2, k.stride(-3), k.stride(-2),
        sv_b1, sv_b2, v.stride(-3), v.stride(-2),
        so_b1, so_b2, out.stride(-3), out.stride(-2),
        b2, n_heads, num_pairs, sq, skv,
    )
    meta = dict(
        HEAD_DIM=head_dim, D0=d0, D1=max(d1, 16), HAS_TAIL=d1 > 0,
        MASK_COLS=d1 > 0 and d0 + d1 != head_dim, MASK_MAIN=d0 > head_dim, SQ_PAD=seq_pad(sq), SKV_PAD=seq_pad(skv), PRECISION=dot_precision(q.dtype),
    )
    wrap = wrap or (lambda kernel: kernel)
    if pairs is None and is_interpreted():
        pairs = max(1, INTERPRETER_ROWS // meta["SQ_PAD"])
    if pairs is not None:
        wrap(temporal_attention_kernel)[(triton.cdiv(num_pairs, pairs),)](*args, **meta, PAIRS=pairs)
        return
    wrap(_autotuned_kernel(meta["SQ_PAD"]))[lambda cfg: (triton.cdiv(num_pairs, cfg["PAIRS"]),)](*args, **meta)
