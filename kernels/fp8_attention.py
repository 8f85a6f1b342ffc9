"""Approximate fp8 attention (``kernels="fp8"``): Q and K in e4m3 with per-block scales.

Legend: B batch (one or two leading dims), N heads, S tokens (``Sq`` queries, ``Skv`` keys),
D head dim, ``BN`` = B*N (the flattened (batch, head) index), M query rows of a tile, K key
rows of a tile.

The design is SageAttention's (Zhang et al., 2024-25), with fp8 where it uses int8 for QK:

* K is smoothed: the per-(batch, head) mean of K over tokens is subtracted first. Every score
  of a query row then changes by the same ``q . mean``, which softmax cancels, so this is
  exact; it removes the channel-wise offset K has in DiTs, which would otherwise set the
  quantization scale and leave the varying part with a few levels only.
* Q and K are quantized to e4m3 (3 mantissa bits, max 448) per block of ``QUANT_BLOCK``
  tokens, with one fp32 scale per block (``amax / 448``). The softmax scale and ``log2(e)``
  are folded into Q's scales, so a score costs one product of the two scales.
* P @ V: ``pv="fp8"`` quantizes V per channel (its amax over tokens) and P with the static
  scale 448 (P is in [0, 1]), as SageAttention 2 does; the fp8 product of each key block
  is added to an fp32 accumulator in registers (Hopper's fp8 MMA accumulates with fewer
  bits, so the accumulator is never passed into it). ``pv="native"`` keeps V and P in the
  inputs' dtype (bf16/fp16): half the tensor-core rate of fp8 for that product, but no
  quantization error from it.

The quantization is a PyTorch prologue (``quantize_qkv``): it writes contiguous fp8 copies
padded to a multiple of ``ROW_PAD`` tokens and a head dim of ``D0 + D1`` (zeros), so the
kernel loads whole tiles without masks, plus one scale per token (the block's scale
repeated, so the kernel does not depend on the quantization block size). V for ``pv="fp8"``
is stored transposed, ``(BN, D, Skv)``: Hopper's fp8 MMA needs both operands K-major.

Triton's interpreter (CPU tests): loading fp8 tensors and fp8 ``tl.dot`` are exact there,
but its fp32 -> e4m3 cast drops the carry when rounding up overflows the mantissa (1.98
becomes 1.0, triton 3.9). The only in-kernel cast is P's; under the interpreter P is first
rounded to e4m3's grid in fp32 (``_round_to_e4m3``, bit arithmetic, round to nearest even),
after which the cast is exact. On a GPU the hardware cast does the same rounding and the
emulation is compiled out.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from vdopt.kernels.flash_attention import (
    LOG2E,
    batch_strides,
    dot_precision,
    is_interpreted,
    new_lse,
    new_output,
)

try:  # Triton is optional: the reference and the quantization work without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None

FP8_DTYPE = torch.float8_e4m3fn
"""Triton's ``float8e4nv``: e4m3 with NaN only, max 448 (Hopper's and Ada's fp8 format)."""
FP8_MAX = 448.0
QUANT_BLOCK = 64
"""Tokens per Q and K scale (SageAttention uses 128 for Q and 64 for K)."""
ROW_PAD = 128
"""The fp8 copies' token count is padded to a multiple of this (the largest tile)."""
PV_CHOICES = ("fp8", "native")
DEFAULT_PV = "fp8"
"""What ``kernels="fp8"`` runs: P @ V in fp8 too (SageAttention 2's choice, the fastest on
Hopper); ``"native"`` is kept for the gpu-check to measure against."""
MIN_CAPABILITY = (8, 9)
"""fp8 tensor cores: Ada (8.9: L4, L40), Hopper (9.0: H100, H200), Blackwell (10.x, 12.x)."""


def fp8_head_dim_split(head_dim: int) -> tuple[int, int]:
    """``(D0, D1)`` of the padded fp8 copies: a power-of-two main part and a tail, both >= 32.

    fp8 MMAs take 32 values per K step, so 16-wide parts (the bf16 kernel's minimum) are
    widened: 72 -> (64, 32), 80 -> (64, 32), 96 -> (64, 32), 128 -> (128, 0), 8..32 -> (32, 0).
    """
    if head_dim <= 32:
        return 32, 0
    main = min(1 << (head_dim.bit_length() - 1), 128)
    rest = head_dim - main
    tail = 0 if rest == 0 else max(32, 1 << (rest - 1).bit_length())
    return main, tail


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why fp8 attention cannot run on ``device`` (a sentence naming what was found), or None."""
    if triton is None:
        return "Triton is not installed"
    if device.type == "cuda":
        if torch.version.hip is not None:
            return f"found {torch.cuda.get_device_name(device)} (ROCm: its fp8 is e4m3fnuz, not supported yet)"
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (f"found {torch.cuda.get_device_name(device)} (compute capability "
                    f"{capability[0]}.{capability[1]}, no fp8 tensor cores)")
        return None
    if device.type == "cpu" and is_interpreted():
        return None  # Triton's interpreter: the CPU tests
    return f"found device {device.type!r} (on the CPU it runs only under TRITON_INTERPRET=1, for tests)"


def check_fp8_device(device: torch.device) -> None:
    """Raise a ValueError that says what to use instead when ``device`` cannot run fp8 attention."""
    reason = fp8_unsupported_reason(device)
    if reason is not None:
        raise ValueError(
            "kernels='fp8' needs an NVIDIA GPU with fp8 tensor cores (compute capability 8.9 or newer: "
            f"L4/L40, H100/H200, Blackwell); {reason}. Use kernels='auto' (vdopt's bf16 kernels where "
            "measured faster, else SDPA), kernels='triton' or kernels='sdpa' instead."
        )


# ---------------------------------------------------------------------------------------------
# Quantization (PyTorch prologue) and the reference
# ---------------------------------------------------------------------------------------------


def _pad_rows(n: int) -> int:
    return max(ROW_PAD, -(-n // ROW_PAD) * ROW_PAD)


def quantize_rows(x: torch.Tensor, d_pad: int, s_pad: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x8, scales)``: ``(BN, S, D)`` in e4m3 per block of ``QUANT_BLOCK`` rows, padded to
    ``(BN, s_pad, d_pad)`` with zeros; ``scales`` fp32 ``(BN, s_pad)``, one per row (the
    block's ``amax / 448``, times ``scale``), so ``x ~= x8 * scales[..., None] / scale``."""
    bn, s, d = x.shape
    padded = F.pad(x.float(), (0, d_pad - d, 0, s_pad - s))
    blocks = padded.view(bn, s_pad // QUANT_BLOCK, QUANT_BLOCK, d_pad)
    # An all-zero block (padding) gets a tiny scale instead of 0/0.
    block_scale = blocks.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-30) / FP8_MAX
    x8 = (blocks / block_scale).to(FP8_DTYPE).view(bn, s_pad, d_pad)
    scales = (block_scale * scale).expand(bn, s_pad // QUANT_BLOCK, QUANT_BLOCK, 1).reshape(bn, s_pad)
    return x8, scales


def quantize_columns(v: torch.Tensor, d_pad: int, s_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v8t, scales)``: V per channel in e4m3, transposed and padded ``(BN, d_pad, s_pad)``;
    ``scales`` fp32 ``(BN, d_pad)`` (a channel's amax over tokens / 448)."""
    bn, s, d = v.shape
    padded = F.pad(v.float(), (0, d_pad - d, 0, s_pad - s))
    scales = padded.abs().amax(dim=-2).clamp_min(1e-30) / FP8_MAX
    v8t = (padded / scales[:, None, :]).to(FP8_DTYPE).transpose(1, 2).contiguous()
    return v8t, scales


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, pv: str) -> dict[str, torch.Tensor]:
    """The kernel's inputs: smoothed, quantized, padded copies of Q, K and V (module docstring).

    ``q``: ``(*batch, N, Sq, D)``, ``k``/``v``: ``(*batch, N, Skv, D)``. Returns ``q8``,
    ``q_scale`` (softmax scale and log2(e) folded in), ``k8``, ``k_scale``, ``v`` (fp8
    transposed for ``pv="fp8"``, else a padded copy in V's dtype) and ``v_scale`` (per
    channel; ones for ``pv="native"``) and ``lse_shift`` ``(BN, Sq)``, what smoothing took
    off each row's log-sum-exp.
    """
    head_dim = q.shape[-1]
    d0, d1 = fp8_head_dim_split(head_dim)
    d_pad = d0 + d1
    sq, skv = q.shape[-2], k.shape[-2]
    sq_pad, skv_pad = _pad_rows(sq), _pad_rows(skv)
    q3 = q.reshape(-1, sq, head_dim)
    k3 = k.reshape(-1, skv, head_dim).float()
    v3 = v.reshape(-1, skv, head_dim)
    # Smoothing K: exact for softmax (see the module docstring). The log-sum-exp is not
    # shift-invariant, so the shift of every row's scores is returned to add back.
    k_mean = k3.mean(dim=-2, keepdim=True)
    k3 = k3 - k_mean
    lse_shift = torch.matmul(q3.float(), k_mean.transpose(-1, -2)).squeeze(-1) * scale
    q8, q_scale = quantize_rows(q3, d_pad, sq_pad, scale * LOG2E)
    k8, k_scale = quantize_rows(k3, d_pad, skv_pad)
    if pv == "fp8":
        v_pad, v_scale = quantize_columns(v3, d_pad, skv_pad)
    else:
        v_pad = F.pad(v3, (0, d_pad - head_dim, 0, skv_pad - skv)).contiguous()
        v_scale = torch.ones(v3.shape[0], d_pad, dtype=torch.float32, device=v.device)
    return {"q8": q8, "q_scale": q_scale, "k8": k8, "k_scale": k_scale, "v": v_pad, "v_scale": v_scale,
            "lse_shift": lse_shift}


def fp8_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    *,
    pv: str = "fp8",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 scheme in PyTorch (fp32 math on the quantized values): ``(out, lse)``.

    Used where the kernel cannot run (tracing, CPU without the interpreter). It quantizes P
    against each row's final maximum, the kernel against the running maximum, so the two
    agree to P's rounding, not bitwise.
    """
    *batch, n_heads, sq, head_dim = q.shape
    skv = k.shape[-2]
    t = quantize_qkv(q, k, v, scale, pv)
    qd = (t["q8"].float() * t["q_scale"][..., None])[:, :sq, :head_dim]  # scores in log2 units
    kd = (t["k8"].float() * t["k_scale"][..., None])[:, :skv, :head_dim]
    if pv == "fp8":
        vd = (t["v"].float() * t["v_scale"][..., None]).transpose(1, 2)[:, :skv, :head_dim]
    else:
        vd = t["v"].float()[:, :skv, :head_dim]
    scores = torch.matmul(qd, kd.transpose(-1, -2)) * math.log(2.0)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.reshape(-1, 1, 1, skv).expand(-1, n_heads, 1, skv).reshape(-1, 1, skv),
                                    float("-inf"))
    lse = torch.logsumexp(scores, dim=-1) + t["lse_shift"]
    # Rows without any valid key: m = 0, p = 0, so the output is 0 (and lse -inf).
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0))
    denom = p.sum(dim=-1, keepdim=True)
    if pv == "fp8":  # P quantized with the static scale 448, as in the kernel
        p = (p * FP8_MAX).to(FP8_DTYPE).float() / FP8_MAX
    out = torch.matmul(p, vd) / torch.where(denom > 0, denom, 1.0)
    shape = (*batch, n_heads, sq)
    return out.reshape(*shape, head_dim).to(q.dtype), lse.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------

if triton is not None:
    from vdopt.kernels.flash_attention import _max, _sum

    @triton.jit
    def _round_to_e4m3(x):
        """``x`` (fp32, |x| <= 448) rounded to e4m3's grid, to nearest even (interpreter only)."""
        bits = x.to(tl.int32, bitcast=True)
        # Normal range: keep 3 of fp32's 23 mantissa bits; a carry moves into the exponent.
        lsb = (bits >> 20) & 1
        normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)  # -1048576 = ~0xFFFFF
        # Subnormals (|x| < 2^-6) are multiples of 2^-9: adding 2^14 leaves that as fp32's ulp.
        subnormal = (x + 16384.0) - 16384.0
        return tl.where(tl.abs(x) < 0.015625, subnormal, normal)

    @triton.jit
    def _fp8_step(
        acc0, acc1, m_i, l_i, q0, q1, qs, k_base, v_base, ks_base, mask_base, start_n, Skv,
        offs_n, offs_d0, offs_d1, SKV_PAD: tl.constexpr, D_PAD: tl.constexpr,
        D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr, MASK_KEYS: tl.constexpr,
        HAS_MASK: tl.constexpr, PV_FP8: tl.constexpr, EMULATE_CAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One key block: scores from the fp8 product times the two scales, in log2 units."""
        rows = start_n + offs_n
        k0 = tl.load(k_base + rows[:, None] * D_PAD + offs_d0[None, :])
        qk = tl.dot(q0, tl.trans(k0))
        if HAS_TAIL:
            k1 = tl.load(k_base + rows[:, None] * D_PAD + offs_d1[None, :])
            qk = tl.dot(q1, tl.trans(k1), qk)
        ks = tl.load(ks_base + rows)
        s = qk * qs[:, None] * ks[None, :]
        if MASK_KEYS:
            key_valid = rows < Skv
            if HAS_MASK:
                key_valid = key_valid & (tl.load(mask_base + rows) != 0)
            s = tl.where(key_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, _max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, _max(s, 1))
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + _sum(p, 1)
        if PV_FP8:
            p = p * 448.0
            if EMULATE_CAST:
                p = _round_to_e4m3(p)
            p8 = p.to(tl.float8e4nv)
            # V is stored (D, Skv): load (D, K) tiles and transpose, so the operand is K-major.
            v0 = tl.trans(tl.load(v_base + offs_d0[:, None] * SKV_PAD + rows[None, :]))
            # Into a fresh accumulator, then added in fp32 (fp8 MMA accumulates with fewer bits).
            acc0 = acc0 * alpha[:, None] + tl.dot(p8, v0)
            if HAS_TAIL:
                v1 = tl.trans(tl.load(v_base + offs_d1[:, None] * SKV_PAD + rows[None, :]))
                acc1 = acc1 * alpha[:, None] + tl.dot(p8, v1)
        else:
            v0 = tl.load(v_base + rows[:, None] * D_PAD + offs_d0[None, :])
            acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=PRECISION)
            if HAS_TAIL:
                v1 = tl.load(v_base + rows[:, None] * D_PAD + offs_d1[None, :])
                acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=PRECISION)
        return acc0, acc1, m_new, l_i

    @triton.jit
    def fp8_attention_kernel(
        Q8, QS, K8, KS, V, VS, O, LSE, KEY_MASK,
        so_b1, so_b2, so_n, so_s, B2, N, Sq, Skv,
        SQ_PAD: tl.constexpr, SKV_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        D0: tl.constexpr, D1: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_MASK: tl.constexpr,
        PV_FP8: tl.constexpr, EMULATE_CAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        num_m = SQ_PAD // BLOCK_M
        tile = tl.program_id(0)
        # Query blocks of one (batch, head) are adjacent in the tile order so K/V stay in L2.
        bn = (tile // num_m).to(tl.int64)
        start_m = (tile % num_m) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d0 = tl.arange(0, D0)
        offs_d1 = D0 + tl.arange(0, D1)

        # The padded copies need no masks: every tile is inside them.
        q_base = Q8 + bn * SQ_PAD * D_PAD
        q0 = tl.load(q_base + offs_m[:, None] * D_PAD + offs_d0[None, :])
        if HAS_TAIL:
            q1 = tl.load(q_base + offs_m[:, None] * D_PAD + offs_d1[None, :])
        else:
            q1 = q0
        qs = tl.load(QS + bn * SQ_PAD + offs_m)
        k_base = K8 + bn * SKV_PAD * D_PAD
        v_base = V + bn * SKV_PAD * D_PAD
        ks_base = KS + bn * SKV_PAD
        mask_base = KEY_MASK + (bn // N) * SKV_PAD

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        acc0 = tl.full([BLOCK_M, D0], 0.0, dtype=tl.float32)
        acc1 = tl.full([BLOCK_M, D1], 0.0, dtype=tl.float32)

        # Whole key blocks without a key-padding mask need no masking at all.
        n_full = 0 if HAS_MASK else (Skv // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc0, acc1, m_i, l_i = _fp8_step(
                acc0, acc1, m_i, l_i, q0, q1, qs, k_base, v_base, ks_base, mask_base, start_n, Skv,
                offs_n, offs_d0, offs_d1, SKV_PAD, D_PAD, D0, D1, HAS_TAIL, False, HAS_MASK,
                PV_FP8, EMULATE_CAST, PRECISION)
        for start_n in range(n_full, Skv, BLOCK_N):
            acc0, acc1, m_i, l_i = _fp8_step(
                acc0, acc1, m_i, l_i, q0, q1, qs, k_base, v_base, ks_base, mask_base, start_n, Skv,
                offs_n, offs_d0, offs_d1, SKV_PAD, D_PAD, D0, D1, HAS_TAIL, True, HAS_MASK,
                PV_FP8, EMULATE_CAST, PRECISION)

        # Epilogue: V's per-channel scales (and P's 448) applied once; rows without a valid
        # key give 0 and lse = -inf, as in the bf16 kernel.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + bn * Sq + offs_m, lse, mask=offs_m < Sq)
        b = bn // N
        n = bn % N
        o_base = O + (b // B2) * so_b1 + (b % B2) * so_b2 + n * so_n
        vs0 = tl.load(VS + bn * D_PAD + offs_d0)
        if PV_FP8:
            vs0 = vs0 * (1.0 / 448.0)
        out0 = acc0 * vs0[None, :] / l_safe[:, None]
        row_ok = (offs_m < Sq)[:, None]
        tl.store(o_base + offs_m[:, None] * so_s + offs_d0[None, :], out0.to(O.dtype.element_ty),
                 mask=row_ok & (offs_d0 < HEAD_DIM)[None, :])
        if HAS_TAIL:
            vs1 = tl.load(VS + bn * D_PAD + offs_d1)
            if PV_FP8:
                vs1 = vs1 * (1.0 / 448.0)
            out1 = acc1 * vs1[None, :] / l_safe[:, None]
            tl.store(o_base + offs_m[:, None] * so_s + offs_d1[None, :], out1.to(O.dtype.element_ty),
                     mask=row_ok & (offs_d1 < HEAD_DIM)[None, :])


# ---------------------------------------------------------------------------------------------
# Configurations and launcher
# ---------------------------------------------------------------------------------------------

INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32}

# (BLOCK_M, BLOCK_N, num_warps, num_stages). fp8 halves the bytes of a K/V tile, so wider key
# tiles fit the same shared memory; 128x128 with 8 warps is the FA3-fp8 / Triton-tutorial
# choice at D=128. Not yet measured on an H100: the gpu-check's fp8 stage autotunes them.
_CUDA_TILES = (
    (128, 64, 4, 3),
    (128, 128, 8, 3),
    (128, 128, 8, 4),
    (128, 64, 8, 4),
    (64, 128, 4, 3),
)


@functools.cache
def _autotuned_kernel():
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in _CUDA_TILES]
    return triton.autotune(configs, key=["Sq", "Skv", "HEAD_DIM", "HAS_MASK", "PV_FP8"])(fp8_attention_kernel)


def fp8_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    *,
    pv: str = "fp8",
    wrap=None,
    config: dict | None = None,
) -> None:
    """Quantize, then launch the fp8 kernel, writing ``out`` and ``lse`` in place.

    Shapes as ``flash_attention_forward``: ``q``/``out`` ``(*batch, N, Sq, D)``, ``k``/``v``
    ``(*batch, N, Skv, D)``, ``lse`` fp32 ``(*batch, N, Sq)``, ``key_mask`` bool
    ``(*batch, Skv)``. ``pv``: ``"fp8"`` or ``"native"`` (P @ V in V's dtype).
    ``config`` pins ``BLOCK_M``/``BLOCK_N`` (tests, benchmarks).
    """
    assert triton is not None, "fp8_attention_forward needs Triton"
    if pv not in PV_CHOICES:
        raise ValueError(f"pv={pv!r}: choose one of {PV_CHOICES}")
    *batch, n_heads, sq, head_dim = q.shape
    skv = k.shape[-2]
    d0, d1 = fp8_head_dim_split(head_dim)
    t = quantize_qkv(q, k, v, scale, pv)
    sq_pad, skv_pad = t["q8"].shape[1], t["k8"].shape[1]
    if key_mask is not None:
        mask = F.pad(key_mask.reshape(-1, skv).to(torch.int8), (0, skv_pad - skv)).contiguous()
    else:
        mask = t["k_scale"]  # never read (HAS_MASK is False)
    b2, so_b1, so_b2 = batch_strides(out, 3)
    interpreted = is_interpreted()
    args = (t["q8"], t["q_scale"], t["k8"], t["k_scale"], t["v"], t["v_scale"], out, lse, mask,
            so_b1, so_b2, out.stride(-3), out.stride(-2), b2, n_heads, sq, skv)
    meta = dict(
        SQ_PAD=sq_pad, SKV_PAD=skv_pad, HEAD_DIM=head_dim, D_PAD=d0 + d1, D0=d0, D1=max(d1, 32), HAS_TAIL=d1 > 0,
        HAS_MASK=key_mask is not None, PV_FP8=pv == "fp8", EMULATE_CAST=interpreted,
        PRECISION=dot_precision(v.dtype),
    )
    wrap = wrap or (lambda kernel: kernel)
    num_bn = math.prod(batch) * n_heads
    if interpreted or config is not None:
        cfg = dict(INTERPRETER_CONFIG if config is None else config)
        wrap(fp8_attention_kernel)[(sq_pad // cfg["BLOCK_M"] * num_bn,)](*args, **meta, **cfg)
    else:
        wrap(_autotuned_kernel())[lambda cfg: (sq_pad // cfg["BLOCK_M"] * num_bn,)](*args, **meta)
    lse.add_(t["lse_shift"].view(lse.shape))


def fp8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None,
    *, pv: str = "fp8", config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the fp8 kernel (a convenience for tests and benchmarks)."""
    out, lse = new_output(q), new_lse(q)
    fp8_attention_forward(q, k, v, out, lse, scale, key_mask, pv=pv, config=config)
    return out, lse
