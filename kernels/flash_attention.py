"""Flash-attention forward for long sequences (spatial, full, joint and cross attention).

Legend: B batch (one or two leading dims, ``B1 x B2``), N heads, S tokens (``Sq`` queries,
``Skv`` keys), D head dim, M query rows of a tile, K key rows of a tile.

What the kernel does beyond the textbook FA2 loop:

* Strided inputs. Q/K/V/O are addressed through their strides, so the ``(B, S, N, D)`` views
  the models make (``x.view(B, S, N, D).transpose(1, 2)``) are read without a copy. Only the
  head dim must be contiguous (stride 1), which every producer in practice satisfies.
* Head dims that are not a power of two (72, 80, 96) are split into a power-of-two main part
  and a small tail part (``head_dim_split``): 72 = 64 + 16 with the last 8 columns masked. Both
  parts are legal MMA shapes (K >= 16), and the masked columns are never read from or written
  to memory. Padding 72 to 128 would waste 44% of every matrix product; the split wastes 10%.
* Masked tails. The last key block (``Skv % BLOCK_N``) and an optional key-padding mask
  ``(B, Skv)`` set scores to -inf; rows with no valid key give 0 output and ``lse = -inf``, so
  an all-padding Ring shard merges as a no-op.
* The fp32 log-sum-exp (natural log) of every query row is written for Ring merging.
* Softmax in base 2 with ``scale * log2(e)`` folded into one FMA per score.
* Hopper (sm90+): tensor descriptors (TMA) for Q/K/V/O when the base pointers and strides are
  16-byte aligned, and a persistent schedule as an autotuned choice. Warp specialization of
  the key loop is available to the launcher (``warp_specialize=True``) but not in the default
  configurations: it has not been measured on the H100 yet.

Autotuning only happens on CUDA; the Triton interpreter (``TRITON_INTERPRET=1``) runs one
small fixed configuration so CPU tests stay fast.
"""

from __future__ import annotations

import functools
import math

import torch

try:  # Triton is optional: `import vdopt.kernels` and the reference work without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 8
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch attention with the kernels' semantics: ``(out, lse)``.

    ``q``: ``(*batch, N, Sq, D)``; ``k``/``v``: ``(*batch, N, Skv, D)``; ``key_mask``: bool
    ``(*batch, Skv)``, True = attend. Rows with no valid key give 0 output and
    ``lse = -inf``. By default it computes in fp32 and returns ``out`` in ``q``'s dtype and
    ``lse`` in fp32 ``(*batch, N, Sq)``, natural log, like the kernels; with ``compute_dtype``
    (e.g. fp64 for tests) both come back in that dtype.
    """
    out_dtype, lse_dtype = (q.dtype, torch.float32) if compute_dtype is None else (compute_dtype,) * 2
    compute_dtype = compute_dtype or torch.promote_types(q.dtype, torch.float32)
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[..., None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - -inf) would be NaN for rows without any valid key: make those rows all zero.
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
    out = torch.matmul(probs, vc)
    return out.to(out_dtype), lse.to(lse_dtype)


# ---------------------------------------------------------------------------------------------
# Shapes and layout helpers shared with the short-sequence kernel
# ---------------------------------------------------------------------------------------------


def head_dim_split(head_dim: int) -> tuple[int, int]:
    """``(D0, D1)``: a power-of-two main part and a power-of-two tail (0 when not needed).

    The tail covers ``head_dim - D0`` columns rounded up to a power of two of at least 16
    (the smallest MMA K); its columns past ``head_dim`` are masked. 72 -> (64, 16),
    80 -> (64, 16), 96 -> (64, 32), 128 -> (128, 0), 160 -> (128, 32), 8 -> (16, 0).
    """
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    if head_dim < 16:  # tiny test models: one 16-wide part, masked
        return 16, 0
    main = min(1 << (head_dim.bit_length() - 1), 128)
    rest = head_dim - main
    tail = 0 if rest == 0 else max(16, 1 << (rest - 1).bit_length())
    return main, tail


def batch_strides(t: torch.Tensor, extra_dims: int) -> tuple[int, int, int]:
    """``(B2, stride_B1, stride_B2)`` of ``t``'s one or two leading batch dims.

    ``extra_dims`` is the number of trailing non-batch dims (3 for Q/K/V/O, 1 for the key
    mask). One batch dim reads as ``B1 = B, B2 = 1``.
    """
    batch_dims = t.dim() - extra_dims
    assert batch_dims in (1, 2), f"expected 1 or 2 batch dims, got shape {tuple(t.shape)}"
    if batch_dims == 1:
        return 1, t.stride(0), 0
    return t.shape[1], t.stride(0), t.stride(1)


def new_output(q: torch.Tensor) -> torch.Tensor:
    """The output buffer: ``q``'s shape, dtype and dimension order (like SDPA).

    ``empty_like`` keeps the stride order of a strided ``q``, so a ``(B, S, N, D)`` view in
    gives a ``(B, S, N, D)``-ordered output and the usual ``transpose(1, 2).reshape(B, S, C)``
    after attention stays a view. The fake implementation uses the same call.
    """
    return torch.empty_like(q, memory_format=torch.preserve_format)


def new_lse(q: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)


def is_interpreted() -> bool:
    """Whether the Triton kernels run under the interpreter (``TRITON_INTERPRET=1``)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products; tf32 would add ~1e-3 error nobody asked for.
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------

if triton is not None:
    # tl.max, tl.sum, tl.zeros and tl.cdiv are themselves @triton.jit functions. When Triton
    # was imported before TRITON_INTERPRET=1 was set (importing diffusers imports it), they
    # are compiled-mode objects the interpreter cannot call. The kernels use builtins only,
    # so they run under the interpreter whenever this module loads after the flag is set.
    # The combine functions below are the ones tl.max/tl.sum use (the interpreter maps them to
    # numpy, a GPU compiles the same reduction).

    @triton.jit
    def _max(x, axis: tl.constexpr):
        return tl.reduce(x, axis, tl.standard._elementwise_max)

    @triton.jit
    def _sum(x, axis: tl.constexpr):
        return tl.reduce(x, axis, tl.standard._sum_combine)

    @triton.jit
    def _online_softmax_step(
        acc0, acc1, m_i, l_i, q0, q1, k0, k1, v0, v1, key_valid, qk_scale,
        HAS_TAIL: tl.constexpr, MASK_KEYS: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One key block of the FA2 loop; scores and running max are in log2 units."""
        qk = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
        if HAS_TAIL:
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=PRECISION)
        if MASK_KEYS:
            s = tl.where(key_valid[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, _max(s, 1))
            # A row with no valid key so far keeps m = -inf; subtract 0 instead (-inf - -inf).
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
        else:
            m_new = tl.maximum(m_i, _max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + _sum(p, 1)
        p = p.to(v0.dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if HAS_TAIL:
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PRECISION)
        return acc0, acc1, m_new, l_i

    @triton.jit
    def _load_rows(base, offs_row, stride_row, offs_d, n_rows, HEAD_DIM: tl.constexpr,
                   MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
        ptrs = base + offs_row[:, None] * stride_row + offs_d[None, :]
        if MASK_ROWS and MASK_COLS:
            return tl.load(ptrs, mask=(offs_row[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif MASK_ROWS:
            return tl.load(ptrs, mask=offs_row[:, None] < n_rows, other=0.0)
        elif MASK_COLS:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            return tl.load(ptrs)

    @triton.jit
    def _flash_tile(
        tile, Q, K, V, O, LSE, KEY_MASK, qk_scale,
        sq_b1, sq_b2, sq_n, sq_s, sk_b1, sk_b2, sk_n, sk_s, sv_b1, sv_b2, sv_n, sv_s,
        so_b1, so_b2, so_n, so_s, sm_b1, sm_b2, sm_s,
        B2, N, Sq, Skv,
        HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr,
        MASK_COLS: tl.constexpr, MASK_MAIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_MASK: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        num_m = (Sq + BLOCK_M - 1) // BLOCK_M
        # Query blocks of one (batch, head) are adjacent in the tile order so K/V stay in L2.
        bn = tile // num_m
        start_m = (tile % num_m) * BLOCK_M
        n = bn % N
        b = bn // N
        b1 = (b // B2).to(tl.int64)
        b2 = (b % B2).to(tl.int64)
        n = n.to(tl.int64)
        q_base = Q + b1 * sq_b1 + b2 * sq_b2 + n * sq_n
        k_base = K + b1 * sk_b1 + b2 * sk_b2 + n * sk_n
        v_base = V + b1 * sv_b1 + b2 * sv_b2 + n * sv_n
        o_base = O + b1 * so_b1 + b2 * so_b2 + n * so_n

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d0 = tl.arange(0, D0)
        offs_d1 = D0 + tl.arange(0, D1)

        if USE_TMA:
            # Out-of-bounds rows/columns of a descriptor load read as zero and stores are
            # clipped, so tails need no masks here.
            q_desc0 = tl.make_tensor_descriptor(q_base, [Sq, HEAD_DIM], [sq_s, 1], [BLOCK_M, D0])
            k_desc0 = tl.make_tensor_descriptor(k_base, [Skv, HEAD_DIM], [sk_s, 1], [BLOCK_N, D0])
            v_desc0 = tl.make_tensor_descriptor(v_base, [Skv, HEAD_DIM], [sv_s, 1], [BLOCK_N, D0])
            o_desc0 = tl.make_tensor_descriptor(o_base, [Sq, HEAD_DIM], [so_s, 1], [BLOCK_M, D0])
            q0 = q_desc0.load([start_m, 0])
            if HAS_TAIL:
                q_desc1 = tl.make_tensor_descriptor(q_base, [Sq, HEAD_DIM], [sq_s, 1], [BLOCK_M, D1])
                k_desc1 = tl.make_tensor_descriptor(k_base, [Skv, HEAD_DIM], [sk_s, 1], [BLOCK_N, D1])
                v_desc1 = tl.make_tensor_descriptor(v_base, [Skv, HEAD_DIM], [sv_s, 1], [BLOCK_N, D1])
                o_desc1 = tl.make_tensor_descriptor(o_base, [Sq, HEAD_DIM], [so_s, 1], [BLOCK_M, D1])
                q1 = q_desc1.load([start_m, D0])
            else:
                q1 = q0
        else:
            q0 = _load_rows(q_base, offs_m, sq_s, offs_d0, Sq, HEAD_DIM, True, MASK_MAIN)
            if HAS_TAIL:
                q1 = _load_rows(q_base, offs_m, sq_s, offs_d1, Sq, HEAD_DIM, True, MASK_COLS)
            else:
                q1 = q0

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        acc0 = tl.full([BLOCK_M, D0], 0.0, dtype=tl.float32)
        acc1 = tl.full([BLOCK_M, D1], 0.0, dtype=tl.float32)
        mask_base = KEY_MASK + b1 * sm_b1 + b2 * sm_b2

        # Full key blocks: no bounds masks (only the optional key-padding mask).
        n_full = (Skv // BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            rows = start_n + offs_n
            if USE_TMA:
                k0 = k_desc0.load([start_n, 0])
                v0 = v_desc0.load([start_n, 0])
                if HAS_TAIL:
                    k1 = k_desc1.load([start_n, D0])
                    v1 = v_desc1.load([start_n, D0])
                else:
                    k1 = k0
                    v1 = v0
            else:
                k0 = _load_rows(k_base, rows, sk_s, offs_d0, Skv, HEAD_DIM, False, MASK_MAIN)
                v0 = _load_rows(v_base, rows, sv_s, offs_d0, Skv, HEAD_DIM, False, MASK_MAIN)
                if HAS_TAIL:
                    k1 = _load_rows(k_base, rows, sk_s, offs_d1, Skv, HEAD_DIM, False, MASK_COLS)
                    v1 = _load_rows(v_base, rows, sv_s, offs_d1, Skv, HEAD_DIM, False, MASK_COLS)
                else:
                    k1 = k0
                    v1 = v0
            if HAS_MASK:
                key_valid = tl.load(mask_base + rows * sm_s) != 0
            else:
                key_valid = rows < Skv
            acc0, acc1, m_i, l_i = _online_softmax_step(
                acc0, acc1, m_i, l_i, q0, q1, k0, k1, v0, v1, key_valid, qk_scale,
                HAS_TAIL, HAS_MASK, PRECISION)

        # The partial last key block: out-of-range keys get -inf scores.
        if n_full < Skv:
            rows = n_full + offs_n
            if USE_TMA:
                k0 = k_desc0.load([n_full, 0])
                v0 = v_desc0.load([n_full, 0])
                if HAS_TAIL:
                    k1 = k_desc1.load([n_full, D0])
                    v1 = v_desc1.load([n_full, D0])
                else:
                    k1 = k0
                    v1 = v0
            else:
                k0 = _load_rows(k_base, rows, sk_s, offs_d0, Skv, HEAD_DIM, True, MASK_MAIN)
                v0 = _load_rows(v_base, rows, sv_s, offs_d0, Skv, HEAD_DIM, True, MASK_MAIN)
                if HAS_TAIL:
                    k1 = _load_rows(k_base, rows, sk_s, offs_d1, Skv, HEAD_DIM, True, MASK_COLS)
                    v1 = _load_rows(v_base, rows, sv_s, offs_d1, Skv, HEAD_DIM, True, MASK_COLS)
                else:
                    k1 = k0
                    v1 = v0
            key_valid = rows < Skv
            if HAS_MASK:
                key_valid = key_valid & (tl.load(mask_base + rows * sm_s, mask=key_valid, other=0) != 0)
            acc0, acc1, m_i, l_i = _online_softmax_step(
                acc0, acc1, m_i, l_i, q0, q1, k0, k1, v0, v1, key_valid, qk_scale,
                HAS_TAIL, True, PRECISION)

        # Epilogue: rows without any valid key (l = 0) give 0 and lse = -inf.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + bn.to(tl.int64) * Sq + offs_m, lse, mask=offs_m < Sq)
        out0 = (acc0 / l_safe[:, None]).to(O.dtype.element_ty)
        if USE_TMA:
            o_desc0.store([start_m, 0], out0)
            if HAS_TAIL:
                o_desc1.store([start_m, D0], (acc1 / l_safe[:, None]).to(O.dtype.element_ty))
        else:
            row_ok = (offs_m < Sq)[:, None]
            if MASK_MAIN:
                row_ok = row_ok & (offs_d0 < HEAD_DIM)[None, :]
            tl.store(o_base + offs_m[:, None] * so_s + offs_d0[None, :], out0, mask=row_ok)
            if HAS_TAIL:  # (a tail implies an unmasked main part)
                out1 = (acc1 / l_safe[:, None]).to(O.dtype.element_ty)
                tl.store(o_base + offs_m[:, None] * so_s + offs_d1[None, :], out1,
                         mask=row_ok & (offs_d1 < HEAD_DIM)[None, :])

    @triton.jit
    def flash_attention_kernel(
        Q, K, V, O, LSE, KEY_MASK, qk_scale,
        sq_b1, sq_b2, sq_n, sq_s, sk_b1, sk_b2, sk_n, sk_s, sv_b1, sv_b2, sv_n, sv_s,
        so_b1, so_b2, so_n, so_s, sm_b1, sm_b2, sm_s,
        B2, N, Sq, Skv, num_bn,
        HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr,
        MASK_COLS: tl.constexpr, MASK_MAIN: tl.constexpr, HAS_MASK: tl.constexpr, USE_TMA: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PERSISTENT: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr,
    ):
        if PERSISTENT:
            # One program per SM walks the tiles: no partial last wave of programs.
            num_tiles = (Sq + BLOCK_M - 1) // BLOCK_M * num_bn
            for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
                _flash_tile(
                    tile, Q, K, V, O, LSE, KEY_MASK, qk_scale,
                    sq_b1, sq_b2, sq_n, sq_s, sk_b1, sk_b2, sk_n, sk_s, sv_b1, sv_b2, sv_n, sv_s,
                    so_b1, so_b2, so_n, so_s, sm_b1, sm_b2, sm_s, B2, N, Sq, Skv,
                    HEAD_DIM, D0, D1, HAS_TAIL, MASK_COLS, MASK_MAIN, BLOCK_M, BLOCK_N, HAS_MASK, USE_TMA,
                    WARP_SPECIALIZE, PRECISION)
        else:
            _flash_tile(
                tl.program_id(0), Q, K, V, O, LSE, KEY_MASK, qk_scale,
                sq_b1, sq_b2, sq_n, sq_s, sk_b1, sk_b2, sk_n, sk_s, sv_b1, sv_b2, sv_n, sv_s,
                so_b1, so_b2, so_n, so_s, sm_b1, sm_b2, sm_s, B2, N, Sq, Skv,
                HEAD_DIM, D0, D1, HAS_TAIL, MASK_COLS, MASK_MAIN, BLOCK_M, BLOCK_N, HAS_MASK, USE_TMA,
                WARP_SPECIALIZE, PRECISION)


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------

# The interpreter runs numpy per block: large blocks mean fewer programs and faster tests,
# while 32-key blocks still exercise multi-block loops and partial tails at test sizes.
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "PERSISTENT": False}

# (BLOCK_M, BLOCK_N, num_warps, num_stages): the FA2/FA3-style tiles that pay on H100 for
# D <= 128 (128x128 with 8 warps is the usual winner at D=64; 128x64 at D=128).
_CUDA_TILES = (
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (64, 64, 4, 3),
    (64, 128, 4, 2),
)


@functools.cache
def _autotuned_kernel(persistent_choices: tuple[bool, ...]):
    configs = [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "PERSISTENT": persistent},
            num_warps=warps,
            num_stages=stages,
        )
        for bm, bn, warps, stages in _CUDA_TILES
        for persistent in persistent_choices
    ]
    return triton.autotune(configs, key=["Sq", "Skv", "HEAD_DIM", "HAS_MASK", "USE_TMA"])(
        flash_attention_kernel
    )


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_allocator_set = False


def _ensure_tma_allocator() -> None:
    # Device-side tensor descriptors need scratch memory from Triton's allocator hook; under
    # AOTInductor the generated launcher allocates it instead.
    global _allocator_set
    if not _allocator_set:
        triton.set_allocator(
            lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda")
        )
        _allocator_set = True


def tma_usable(*tensors: torch.Tensor) -> bool:
    """Whether Q/K/V/O can be read through tensor descriptors (sm90+, 16-byte alignment)."""
    if triton is None or not hasattr(tl, "make_tensor_descriptor"):
        return False
    if not all(t.is_cuda for t in tensors) or torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    for t in tensors:
        esize = t.element_size()
        # Traced (fake) tensors have no address: the caching allocator aligns storages to
        # 512 bytes, so the storage offset decides.
        misaligned = t.data_ptr() % 16 if type(t) is torch.Tensor else (t.storage_offset() * esize) % 16
        if misaligned or t.stride(-1) != 1:
            return False
        # Each (batch, head) base is an offset of the leading strides, so they must align too.
        if any((s * esize) % 16 for s in t.stride()[:-1]):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    *,
    wrap=None,
    use_tma: bool | None = None,
    warp_specialize: bool = False,
    config: dict | None = None,
) -> None:
    """Launch the long-sequence kernel, writing ``out`` and ``lse`` in place.

    Shapes: ``q``/``out`` ``(*batch, N, Sq, D)``, ``k``/``v`` ``(*batch, N, Skv, D)``,
    ``lse`` fp32 contiguous ``(*batch, N, Sq)``, ``key_mask`` bool ``(*batch, Skv)`` (any
    strides, e.g. expanded). ``wrap`` is ``torch.library.wrap_triton`` when called from the
    registered op (so export/Inductor see the launch). ``use_tma`` defaults to
    ``tma_usable``; ``config`` pins ``BLOCK_M``/``BLOCK_N``/``PERSISTENT`` (benchmarks, tests).
    """
    assert triton is not None, "flash_attention_forward needs Triton"
    for t in (q, k, v, out):
        assert t.stride(-1) == 1, "the head dim must be contiguous"
    *batch, n_heads, sq, head_dim = q.shape
    skv = k.shape[-2]
    d0, d1 = head_dim_split(head_dim)
    b2, sq_b1, sq_b2 = batch_strides(q, 3)
    _, sk_b1, sk_b2 = batch_strides(k, 3)
    _, sv_b1, sv_b2 = batch_strides(v, 3)
    _, so_b1, so_b2 = batch_strides(out, 3)
    if key_mask is not None:
        _, sm_b1, sm_b2 = batch_strides(key_mask, 1)
        sm_s = key_mask.stride(-1)
    else:
        sm_b1 = sm_b2 = sm_s = 0
    num_bn = math.prod(batch) * n_heads
    interpreted = is_interpreted()
    if use_tma is None:
        use_tma = not interpreted and tma_usable(q, k, v, out)
    if use_tma:
        _ensure_tma_allocator()

    args = (
        q, k, v, out, lse, key_mask if key_mask is not None else q, scale * LOG2E,
        sq_b1, sq_b2, q.stride(-3), q.stride(-2),
        sk_b1, sk_b2, k.stride(-3), k.stride(-2),
        sv_b1, sv_b2, v.stride(-3), v.stride(-2),
        so_b1, so_b2, out.stride(-3), out.stride(-2),
        sm_b1, sm_b2, sm_s,
        b2, n_heads, sq, skv,
    )
    meta = dict(
        # Without a tail the D1 tensors are unused 16-wide placeholders the compiler drops.
        HEAD_DIM=head_dim, D0=d0, D1=max(d1, 16), HAS_TAIL=d1 > 0,
        MASK_COLS=d1 > 0 and d0 + d1 != head_dim, MASK_MAIN=d0 > head_dim,
        HAS_MASK=key_mask is not None, USE_TMA=use_tma,
        PRECISION=dot_precision(q.dtype), WARP_SPECIALIZE=warp_specialize,
    )
    wrap = wrap or (lambda kernel: kernel)

    def num_tiles(block_m: int) -> int:
        return triton.cdiv(sq, block_m) * num_bn

    if interpreted or config is not None:
        cfg = dict(INTERPRETER_CONFIG if config is None else config)
        tiles = num_tiles(cfg["BLOCK_M"])
        # Off-GPU, pretend to have 4 SMs so the persistent tile loop really loops.
        programs = _num_sms(q.device.index or 0) if q.is_cuda else 4
        grid = (min(tiles, programs) if cfg["PERSISTENT"] else tiles,)
        wrap(flash_attention_kernel)[grid](*args, num_bn, **meta, **cfg)
        return

    sms = _num_sms(q.device.index if q.device.index is not None else torch.cuda.current_device())
    # Persistent scheduling is only offered with TMA (sm90+), where the grid is one wave.
    kernel = _autotuned_kernel((False, True) if use_tma else (False,))
    tiles_by_block_m = {bm: num_tiles(bm) for bm, *_ in _CUDA_TILES}

    def grid(cfg):
        tiles = tiles_by_block_m[cfg["BLOCK_M"]]
        return (min(tiles, sms) if cfg["PERSISTENT"] else tiles,)

    wrap(kernel)[grid](*args, num_bn, **meta)
