"""Attention kernels against an fp64 reference: Triton interpreter on CPU, real kernels on GPU.

The interpreter is set here, before anything imports the kernel modules (they are imported
lazily, on first launch). Interpreter runs use fp32 and fp16: Triton's interpreter does not
support bf16 ``tl.dot`` (it multiplies the raw bit patterns, triton-lang/triton#11584); bf16
is covered by the GPU tests.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vdopt.kernels  # noqa: E402
from vdopt.kernels.flash_attention import (  # noqa: E402
    attention_reference,
    flash_attention_forward,
    head_dim_split,
    new_lse,
    new_output,
)
from vdopt.kernels.temporal_attention import temporal_attention_forward  # noqa: E402

ON_GPU = torch.cuda.is_available()
requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
DEVICE = "cuda" if ON_GPU else "cpu"


def make_qkv(batch, heads, sq, skv, dim, *, dtype=torch.float32, layout="bnsd", gen=None):
    """Random q, k, v in (B, N, S, D) shape; ``bsnd`` gives the models' strided views."""

    def one(s):
        if layout == "bsnd":
            t = torch.randn(batch, s, heads, dim, generator=gen, dtype=torch.float32).transpose(1, 2)
        else:
            t = torch.randn(batch, heads, s, dim, generator=gen, dtype=torch.float32)
        return t.to(dtype=dtype, device=DEVICE)

    return one(sq), one(skv), one(skv)


def assert_matches_reference(out, lse, q, k, v, scale, key_mask=None, *, atol):
    ref_out, ref_lse = attention_reference(q, k, v, scale, key_mask, compute_dtype=torch.float64)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=0)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=2e-5, rtol=1e-6)


def test_head_dim_split_never_pads_to_128():
    assert head_dim_split(64) == (64, 0)
    assert head_dim_split(72) == (64, 16)
    assert head_dim_split(80) == (64, 16)
    assert head_dim_split(96) == (64, 32)
    assert head_dim_split(128) == (128, 0)
    assert head_dim_split(8) == (16, 0)
    with pytest.raises(ValueError):
        head_dim_split(512)


def test_reference_matches_sdpa_and_zeroes_fully_masked_rows(rng_inputs):
    q, k, v = (t.cpu() for t in make_qkv(2, 3, 11, 13, 16, gen=rng_inputs))
    out, lse = attention_reference(q, k, v, 0.25)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.25), atol=1e-6, rtol=1e-5)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1] = False
    out, lse = attention_reference(q, k, v, 0.25, mask)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- long sequences


@requires_triton
@pytest.mark.parametrize(
    "batch, heads, sq, skv, dim, layout",
    [
        (1, 2, 77, 77, 64, "bnsd"),  # odd length: full blocks + a partial tail
        (2, 2, 77, 130, 72, "bsnd"),  # unequal lengths, head dim 72 split 64 + 16, strided views
        (1, 2, 100, 33, 96, "bsnd"),
        (2, 1, 65, 70, 128, "bnsd"),
        (1, 3, 70, 77, 80, "bsnd"),
    ],
)
def test_flash_kernel_matches_fp64_reference(batch, heads, sq, skv, dim, layout, rng_inputs):
    q, k, v = make_qkv(batch, heads, sq, skv, dim, layout=layout, gen=rng_inputs)
    out, lse = new_output(q), new_lse(q)
    flash_attention_forward(q, k, v, out, lse, dim**-0.5)
    assert out.stride() == q.stride() or layout == "bnsd"
    assert_matches_reference(out, lse, q, k, v, dim**-0.5, atol=2e-5)


@requires_triton
def test_flash_kernel_key_mask_and_fully_masked_batch(rng_inputs):
    q, k, v = make_qkv(3, 2, 40, 77, 72, layout="bsnd", gen=rng_inputs)
    mask = torch.rand(3, 77, generator=rng_inputs) > 0.4
    mask[1] = False  # a batch whose keys are all padding: out 0, lse -inf (Ring merges it as a no-op)
    mask[2, :] = True
    mask = mask.to(DEVICE)
    out, lse = new_output(q), new_lse(q)
    flash_attention_forward(q, k, v, out, lse, 0.3, mask)
    assert_matches_reference(out, lse, q, k, v, 0.3, mask, atol=2e-5)
    assert torch.all(out[1] == 0)


@requires_triton
def test_flash_kernel_hopper_paths_under_interpreter(rng_inputs):
    """Tensor descriptors (TMA) and the persistent tile loop compute the same thing."""
    q, k, v = make_qkv(2, 2, 77, 45, 72, layout="bsnd", gen=rng_inputs)
    mask = (torch.rand(2, 45, generator=rng_inputs) > 0.3).to(DEVICE)
    for config in ({"BLOCK_M": 64, "BLOCK_N": 32, "PERSISTENT": False}, {"BLOCK_M": 32, "BLOCK_N": 16, "PERSISTENT": True}):
        out, lse = new_output(q), new_lse(q)
        flash_attention_forward(q, k, v, out, lse, 0.2, mask, use_tma=True, config=config)
        assert_matches_reference(out, lse, q, k, v, 0.2, mask, atol=2e-5)


@requires_triton
def test_flash_kernel_fp16(rng_inputs):
    q, k, v = make_qkv(1, 2, 77, 64, 64, dtype=torch.float16, layout="bsnd", gen=rng_inputs)
    out, lse = new_output(q), new_lse(q)
    flash_attention_forward(q, k, v, out, lse, 0.125)
    assert_matches_reference(out, lse, q, k, v, 0.125, atol=3e-3)


# ----------------------------------------------------------------------------- short sequences


@requires_triton
@pytest.mark.parametrize(
    "batch, heads, seq, dim",
    [(48, 4, 16, 72), (37, 3, 30, 72), (20, 2, 8, 64), (9, 2, 64, 128), (12, 2, 13, 96)],
)
def test_temporal_kernel_matches_fp64_reference(batch, heads, seq, dim, rng_inputs):
    q, k, v = make_qkv(batch, heads, seq, seq, dim, layout="bsnd", gen=rng_inputs)
    out, lse = new_output(q), new_lse(q)
    temporal_attention_forward(q, k, v, out, lse, dim**-0.5)
    assert_matches_reference(out, lse, q, k, v, dim**-0.5, atol=2e-5)


@requires_triton
def test_temporal_kernel_reads_permuted_latent_in_place(rng_inputs):
    """(B, HW, N, T, D) view of a (B, T, HW, N, D) latent: no permute copy before attention."""
    b, t, hw, heads, dim = 2, 16, 12, 2, 72
    latent = torch.randn(b, t, hw, heads, dim, generator=rng_inputs).to(DEVICE)
    q = latent.permute(0, 2, 3, 1, 4)
    kv = torch.randn(b, t, hw, heads, dim, generator=rng_inputs).to(DEVICE).permute(0, 2, 3, 1, 4)
    out, lse = new_output(q), new_lse(q)
    temporal_attention_forward(q, kv, kv, out, lse, 0.1)
    assert out.stride() == q.stride()
    assert_matches_reference(out, lse, q, kv, kv, 0.1, atol=2e-5)


# ----------------------------------------------------------------------------- public API and op


@pytest.mark.parametrize("sq, skv", [(16, 16), (77, 33)])  # temporal kernel, flash kernel
def test_attention_matches_sdpa(sq, skv, rng_inputs):
    q, k, v = make_qkv(2, 2, sq, skv, 72, layout="bsnd", gen=rng_inputs)
    out, lse = vdopt.kernels.attention(q, k, v, return_lse=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-5)
    assert lse.shape == (2, 2, sq)
    mask = torch.rand(2, skv, generator=rng_inputs).to(DEVICE) > 0.5
    mask[:, 0] = True
    out = vdopt.kernels.attention(q, k, v, scale=0.2, key_mask=mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=0.2)
    torch.testing.assert_close(out, sdpa, atol=2e-5, rtol=1e-5)


def test_attention_rejects_unsupported_inputs(rng_inputs):
    q, k, v = make_qkv(1, 2, 8, 8, 16, gen=rng_inputs)
    with pytest.raises(ValueError, match="head_dim"):
        vdopt.kernels.attention(q[..., :4], k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="dtype"):
        vdopt.kernels.attention(q, k.double(), v)
    with pytest.raises(ValueError, match="gqa"):
        vdopt.kernels.attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="bool"):
        vdopt.kernels.attention(q, k, v, key_mask=torch.ones(1, 8, device=DEVICE))


def test_attention_op_opcheck(rng_inputs):
    from vdopt import ops  # noqa: F401

    q, k, v = make_qkv(2, 2, 9, 70, 72, layout="bsnd", gen=rng_inputs)
    mask = (torch.rand(2, 70, generator=rng_inputs) > 0.5).to(DEVICE)
    for args in [(q, k, v, 0.3, None), (q, k, v, 0.3, mask), (q, q, q, 0.2, None)]:
        torch.library.opcheck(torch.ops.vdopt.attention.default, args)


def test_export_keeps_one_attention_node(rng_inputs):
    class Model(torch.nn.Module):
        def forward(self, q, k, v):
            return vdopt.kernels.attention(q, k, v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    q, k, v = make_qkv(2, 2, 20, 20, 16, layout="bsnd", gen=rng_inputs)
    gm = torch.export.export(Model(), (q, k, v), strict=False).module()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.vdopt.attention.default) == 1
    torch.testing.assert_close(gm(q, k, v), Model()(q, k, v))


def test_import_and_reference_fallback_without_triton():
    """Without Triton, ``vdopt::attention`` is a custom op running the reference."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, vdopt, vdopt.kernels\n"
        "q = torch.randn(2, 3, 20, 16)\n"
        "out, lse = vdopt.kernels.attention(q, q, q, return_lse=True)\n"
        "ref = torch.nn.functional.scaled_dot_product_attention(q, q, q)\n"
        "assert (out - ref).abs().max() < 1e-5\n"
        "torch.library.opcheck(torch.ops.vdopt.attention.default, (q, q, q, 0.25, None))\n"
        "assert 'triton' not in {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


# ----------------------------------------------------------------------------- fp8
#
# Tolerances. e4m3 keeps 3 mantissa bits: rounding to nearest has a relative error of at most
# 2^-4 per value, about 2^-4/sqrt(3) = 3.6% RMS. On N(0, 1) data (scores of std 1, the
# hardest case: no peaked softmax to hide behind) Q's and K's roundings give ~3.8% relative
# error of the output, P's and V's add ~3% more in quadrature (both measured: 3.8e-2 and
# 4.9e-2). The bound below, 2 * 2^-4 = 0.125, is two units of e4m3's roundoff; lse is off by
# the scores' error, ~0.03 here (bound 0.125 too). Where the kernel and the PyTorch emulation
# of the same scheme see the same quantized values (``pv="native"``), they agree to fp32
# order (1e-5); with ``pv="fp8"`` P is rounded against the running max in the kernel and the
# final max in the emulation: two roundings of P, at most 2^-4 apart in RMS.

FP8_TOLERANCE = 2 * 2.0**-4
"""Relative L2 error of fp8 attention against exact attention (see above)."""


def _rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from vdopt.kernels.fp8_attention import _round_to_e4m3

    @triton.jit
    def _e4m3_round_trip(X, Y, N: tl.constexpr):
        r = tl.arange(0, N)
        tl.store(Y + r, _round_to_e4m3(tl.load(X + r)).to(tl.float8e4nv).to(tl.float32))


@requires_triton
@pytest.mark.skipif(ON_GPU, reason="the emulated rounding is the interpreter's (compiled out on a GPU)")
def test_interpreter_e4m3_rounding_matches_torch_cast(rng_inputs):
    """The interpreter-only rounding of P (its own fp32 -> e4m3 cast drops mantissa carries)."""
    # Values around carries (1.98 -> 2), ties, subnormals (< 2^-6) and the top of the range.
    x = torch.cat([torch.rand(4000, generator=rng_inputs) * 448, torch.rand(1000, generator=rng_inputs) * 0.03,
                   torch.tensor([1.984, 1.9375, 1.0625, 1.1875, 0.0, 2.0**-9, 3 * 2.0**-10, 447.9, 448.0])])
    n = 8192
    x = torch.nn.functional.pad(x, (0, n - x.numel()))
    y = torch.empty_like(x)
    _e4m3_round_trip[(1,)](x, y, n)
    torch.testing.assert_close(y, x.to(torch.float8_e4m3fn).float(), atol=0, rtol=0)


@requires_triton
@pytest.mark.parametrize("pv", ["fp8", "native"])
@pytest.mark.parametrize(
    "batch, heads, sq, skv, dim, layout, masked",
    [(1, 2, 100, 150, 64, "bnsd", False), ((2, 2), 2, 70, 90, 72, "bsnd", False), (2, 2, 50, 130, 40, "bsnd", True)],
)
def test_fp8_kernel_matches_its_emulation_and_fp64(batch, heads, sq, skv, dim, layout, masked, pv, rng_inputs):
    """Kernel vs the same scheme in PyTorch (tight) and vs exact fp64 attention (e4m3's bound)."""
    from vdopt.kernels.fp8_attention import fp8_attention, fp8_attention_reference

    b1, b2 = batch if isinstance(batch, tuple) else (batch, None)
    q, k, v = make_qkv(b1 * (b2 or 1), heads, sq, skv, dim, layout=layout, gen=rng_inputs)
    # DiT keys carry a large per-channel offset: smoothing must make it harmless.
    k = k + 4 * torch.randn(dim, generator=rng_inputs)
    if b2:
        q, k, v = (t.unflatten(0, (b1, b2)) for t in (q, k, v))
    mask = None
    if masked:
        mask = torch.rand(b1, skv, generator=rng_inputs) > 0.4
        mask[0, 0] = True
        mask[1] = False  # a batch with no valid key: zero output, lse -inf
    scale = dim**-0.5
    out, lse = fp8_attention(q, k, v, scale, mask, pv=pv)
    emulated, emulated_lse = fp8_attention_reference(q, k, v, scale, mask, pv=pv)
    ref, ref_lse = attention_reference(q, k, v, scale, mask, compute_dtype=torch.float64)
    assert out.shape == q.shape and out.stride() == new_output(q).stride() and lse.shape == q.shape[:-1]
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    valid = torch.isfinite(ref_lse)
    assert _rel(out[valid], emulated[valid]) <= (1e-5 if pv == "native" else 2.0**-4)
    assert _rel(out[valid], ref[valid]) <= FP8_TOLERANCE
    assert (lse[valid].double() - ref_lse[valid]).abs().max().item() <= FP8_TOLERANCE
    torch.testing.assert_close(lse[valid], emulated_lse[valid], atol=1e-4, rtol=1e-5)
    if masked:
        assert torch.all(out[1] == 0)


@requires_triton
def test_fp8_kernel_against_the_16_bit_kernel(rng_inputs):
    """fp16 in (the interpreter cannot run bf16 ``tl.dot``): fp8 vs our exact kernel, both vs fp64."""
    from vdopt.kernels.fp8_attention import fp8_attention

    q, k, v = make_qkv(1, 2, 130, 130, 64, dtype=torch.float16, layout="bsnd", gen=rng_inputs)
    out16, lse16 = new_output(q), new_lse(q)
    flash_attention_forward(q, k, v, out16, lse16, 0.125)
    out8, _ = fp8_attention(q, k, v, 0.125)
    ref, _ = attention_reference(q, k, v, 0.125, compute_dtype=torch.float64)
    assert out8.dtype == torch.float16
    assert _rel(out16, ref) <= 2e-3  # fp16 output rounding
    assert _rel(out8, out16) <= FP8_TOLERANCE and _rel(out8, ref) <= FP8_TOLERANCE


def test_fp8_is_refused_with_the_device_found_and_what_to_use():
    from vdopt.kernels.fp8_attention import check_fp8_device, fp8_head_dim_split

    with pytest.raises(ValueError, match=r"compute capability 8.9.*found device 'meta'.*kernels='auto'"):
        check_fp8_device(torch.device("meta"))
    # fp8 MMAs take 32 values per step: parts are at least 32 wide.
    assert [fp8_head_dim_split(d) for d in (8, 32, 64, 72, 96, 128, 160)] == [
        (32, 0), (32, 0), (64, 0), (64, 32), (64, 32), (128, 0), (128, 32)]


# ----------------------------------------------------------------------------- GPU


def _relative_error(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize(
    "batch, heads, sq, skv, dim",
    [(1, 4, 1000, 1000, 128), (2, 4, 1024, 77, 72), (1, 4, 777, 777, 64), (1, 2, 513, 1000, 96), (256, 8, 16, 16, 72), (64, 8, 30, 30, 72)],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_error_at_most_twice_sdpa(batch, heads, sq, skv, dim, dtype, rng_inputs):
    gen = rng_inputs
    q, k, v = make_qkv(batch, heads, sq, skv, dim, dtype=dtype, layout="bsnd", gen=gen)
    ref, ref_lse = attention_reference(q, k, v, dim**-0.5, compute_dtype=torch.float32)
    out, lse = vdopt.kernels.attention(q, k, v, return_lse=True)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    assert _relative_error(out, ref) <= 2 * _relative_error(sdpa, ref)
    torch.testing.assert_close(lse, ref_lse, atol=1e-2, rtol=1e-3)


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_gpu_opcheck_and_key_mask(rng_inputs):
    gen = rng_inputs
    q, k, v = make_qkv(2, 2, 300, 200, 72, dtype=torch.bfloat16, layout="bsnd", gen=gen)
    mask = (torch.rand(2, 200, generator=gen) > 0.5).cuda()
    mask[1] = False
    torch.library.opcheck(torch.ops.vdopt.attention.default, (q, k, v, 0.1, mask))
    out, lse = vdopt.kernels.attention(q, k, v, scale=0.1, key_mask=mask, return_lse=True)
    ref, _ = attention_reference(q, k, v, 0.1, mask, compute_dtype=torch.float32)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)
    assert torch.all(lse[1] == float("-inf"))


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_ring_partial_attention_returns_the_lse_of_sdpa_backends(dtype, rng_inputs):
    """The ring op's per-block attention on CUDA: vdopt's kernel without a mask, SDPA's
    memory-efficient backend (it returns the log-sum-exp) with one, and the blockwise math
    fallback, all against fp32 math; rows whose keys are all masked contribute nothing."""
    from vdopt.ring_attention import attention_with_lse, blockwise_attention_with_lse

    gen = rng_inputs
    q, k, v = make_qkv(2, 4, 333, 250, 64, dtype=dtype, gen=gen)
    mask = (torch.rand(2, 1, 1, 250, generator=gen) > 0.3).cuda()
    mask[1] = False
    ref, ref_lse = attention_reference(q, k, v, 0.125, mask[:, 0, 0], compute_dtype=torch.float32)
    unmasked = attention_reference(q, k, v, 0.125, compute_dtype=torch.float32)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for masked in (None, mask):
        out, lse = attention_with_lse(q, k, v, masked, 0.125)
        want, want_lse = (ref, ref_lse) if masked is not None else unmasked
        torch.testing.assert_close(out.float(), want, atol=tolerance, rtol=0)
        finite = torch.isfinite(want_lse)
        torch.testing.assert_close(lse[finite], want_lse[finite], atol=1e-2, rtol=1e-3)
    assert torch.all(lse[1] == float("-inf")) and torch.all(out[1] == 0)
    out, lse = blockwise_attention_with_lse(q, k, v, mask, 0.125, tile_elements=4096)
    torch.testing.assert_close(out[0].float(), ref[0], atol=tolerance, rtol=0)


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("sq, skv, dim, masked", [(1000, 1000, 128, False), (1024, 77, 72, False), (300, 200, 64, True)])
def test_gpu_fp8_attention_within_e4m3_error_or_refused(sq, skv, dim, masked, rng_inputs):
    """On fp8 hardware (8.9+): bf16 in, e4m3 error bound against fp32 math and the op's
    opcheck; on an older GPU: the ValueError naming it."""
    from vdopt.kernels.dispatch import attention_fp8_forward
    from vdopt.kernels.fp8_attention import fp8_unsupported_reason

    from vdopt import ops  # noqa: F401

    q, k, v = make_qkv(2, 4, sq, skv, dim, dtype=torch.bfloat16, layout="bsnd", gen=rng_inputs)
    mask = (torch.rand(2, skv, generator=rng_inputs) > 0.3).cuda() if masked else None
    if fp8_unsupported_reason(q.device) is not None:
        with pytest.raises(ValueError, match="compute capability"):
            attention_fp8_forward(q, k, v, dim**-0.5, mask)
        return
    out, lse = attention_fp8_forward(q, k, v, dim**-0.5, mask)
    ref, ref_lse = attention_reference(q, k, v, dim**-0.5, mask, compute_dtype=torch.float32)
    assert _relative_error(out, ref) <= FP8_TOLERANCE
    assert (lse - ref_lse).abs().max().item() <= FP8_TOLERANCE
    torch.library.opcheck(torch.ops.vdopt.attention_fp8.default, (q, k, v, dim**-0.5, mask))
