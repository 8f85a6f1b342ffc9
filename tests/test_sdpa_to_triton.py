"""The sdpa_to_triton lowering pass on exported tiny models (Triton interpreter on CPU;
without Triton the lowered op runs the PyTorch reference and the same checks hold)."""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vdopt  # noqa: E402
from vdopt.mesh import Mesh  # noqa: E402
from vdopt.passes.base import PassContext  # noqa: E402
from vdopt.passes.lowering.sdpa_to_triton import SdpaToTriton, find_sdpa_sites  # noqa: E402

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class SelfAttention(nn.Module):
    """Heads split with view + transpose, as diffusers does: q/k/v are (B, S, N, D) views."""

    def __init__(self, dim=32, heads=2, mask_mode=None, causal=False):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.heads, self.mask_mode, self.causal = heads, mask_mode, causal

    def forward(self, x, key_mask):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, c // self.heads).unbind(2)
        mask = None
        if self.mask_mode == "bool":
            mask = key_mask[:, None, None, :]
        elif self.mask_mode == "bool_shared":
            mask = key_mask[:1, None, None, :]
        elif self.mask_mode == "float":
            mask = (~key_mask[:, None, None, :]).float() * -10000.0
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=self.causal
        )
        return self.out(o.transpose(1, 2).reshape(b, s, c))


class Blocks(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, key_mask):
        for layer in self.layers:
            x = x + layer(x, key_mask)
        return x


def export(model, *args):
    return torch.export.export(model.eval(), args, strict=False).module()


def run_pass(gm, kernels="triton", device="cpu"):
    ctx = PassContext(mesh=Mesh(), device=torch.device(device), kernels=kernels)
    return SdpaToTriton()(gm, ctx)


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def test_lowers_supported_sites_and_keeps_the_rest(rng_inputs):
    model = Blocks(
        SelfAttention(),  # lowered
        SelfAttention(mask_mode="bool"),  # lowered, mask passed as (B, Skv)
        SelfAttention(mask_mode="bool_shared"),  # lowered, (1, Skv) mask expanded to B
        SelfAttention(mask_mode="float"),  # kept: additive float mask
        SelfAttention(causal=True),  # kept: causal
        SelfAttention(heads=8),  # kept: head dim 4
    )
    x = torch.randn(2, 77, 32, generator=rng_inputs)
    key_mask = torch.rand(2, 77, generator=rng_inputs) > 0.3
    key_mask[:, 0] = True
    with torch.no_grad():
        ref = model(x, key_mask)
    gm = export(model, x, key_mask)
    assert [s.reason for s in find_sdpa_sites(gm.graph)] == [None, None, None, "float_mask", "causal", "head_dim"]

    result = run_pass(gm)
    gm.graph.lint()
    gm.recompile()
    assert result.modified
    assert result.stats == {"lowered": 3, "kept_causal": 1, "kept_float_mask": 1, "kept_head_dim": 1}
    assert count(gm, torch.ops.vdopt.attention.default) == 3
    assert count(gm, SDPA) == 3
    for node in gm.graph.nodes:
        if node.target is torch.ops.vdopt.attention.default:
            assert node.meta["vdopt.created_by"] == "sdpa_to_triton" and "val" in node.meta
    with torch.no_grad():
        out = gm(x, key_mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_latte_tiny_model(rng_inputs):
    """All six attention sites of a 2-layer Latte (spatial, cross, temporal) are lowered."""
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng_inputs)))
    model = LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8, patch_size=2,
        in_channels=4, out_channels=8, cross_attention_dim=16, caption_channels=16, video_length=3,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000,
    ).eval()
    x = torch.randn(2, 4, 3, 8, 8, generator=rng_inputs)
    kwargs = dict(
        encoder_hidden_states=torch.randn(2, 5, 16, generator=rng_inputs),
        timestep=torch.tensor([10, 500]),
        return_dict=False,
    )
    with torch.no_grad():
        ref = model(x, **kwargs)[0]
    gm = torch.export.export(model, (x,), kwargs, strict=False).module()
    result = run_pass(gm)
    gm.recompile()
    assert result.stats == {"lowered": 6}
    assert count(gm, SDPA) == 0
    with torch.no_grad():
        out = gm(x, **kwargs)[0]
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("kernels, device", [("sdpa", "cpu"), ("auto", "cpu")])
def test_not_lowered_unless_asked_or_on_cuda(kernels, device, rng_inputs):
    x = torch.randn(1, 20, 32, generator=rng_inputs)
    gm = export(SelfAttention(), x, torch.ones(1, 20, dtype=torch.bool))
    result = run_pass(gm, kernels=kernels, device=device)
    assert not result.modified and count(gm, SDPA) == 1


def test_optimize_with_triton_kernels_matches_eager(rng_inputs):
    model = Blocks(SelfAttention(), SelfAttention()).eval()
    x = torch.randn(2, 40, 32, generator=rng_inputs)
    key_mask = torch.ones(2, 40, dtype=torch.bool)
    with torch.no_grad():
        ref = model(x, key_mask)
    opt = vdopt.optimize(model, kernels="triton")
    torch.testing.assert_close(opt(x, key_mask), ref, atol=1e-5, rtol=1e-5)
    assert "lowered=2" in opt.report()


# -- kernels="fp8" (approximate) --------------------------------------------------------------

def test_fp8_lowers_long_sites_and_keeps_short_ones_exact(rng_inputs):
    """Long sites get the fp8 op, short unmasked (temporal-like) ones the exact kernel; the
    model's output stays within e4m3's error (tests/test_kernels.py: FP8_TOLERANCE)."""
    import vdopt.ops  # noqa: F401

    model = Blocks(SelfAttention(), SelfAttention(mask_mode="bool")).eval()
    for seq, want_fp8 in ((77, 2), (20, 1)):  # at 20 tokens the masked site still takes fp8
        x = torch.randn(2, seq, 32, generator=rng_inputs)
        key_mask = torch.rand(2, seq, generator=rng_inputs) > 0.3
        key_mask[:, 0] = True
        with torch.no_grad():
            ref = model(x, key_mask)
        gm = export(model, x, key_mask)
        result = run_pass(gm, kernels="fp8")
        gm.recompile()
        assert result.stats["lowered"] == 2 and result.stats["lowered_fp8"] == want_fp8
        assert count(gm, torch.ops.vdopt.attention_fp8.default) == want_fp8
        assert count(gm, torch.ops.vdopt.attention.default) == 2 - want_fp8
        with torch.no_grad():
            out = gm(x, key_mask)
        error = ((out - ref).norm() / ref.norm()).item()
        assert 0 < error <= 2 * 2.0**-4, error


def test_fp8_is_refused_where_there_is_no_fp8_hardware(monkeypatch, rng_inputs):
    """The CPU without Triton's interpreter stands for any device without fp8 tensor cores."""
    import triton

    x = torch.randn(1, 80, 32, generator=rng_inputs)
    gm = export(SelfAttention(), x, torch.ones(1, 80, dtype=torch.bool))
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(ValueError, match=r"kernels='fp8' needs .*compute capability 8.9.*found device 'cpu'.*"
                                         r"kernels='auto'"):
        run_pass(gm, kernels="fp8")
    with pytest.raises(ValueError, match="pass 'sdpa_to_triton': kernels='fp8' needs"):
        vdopt.optimize(SelfAttention(), kernels="fp8")(x, torch.ones(1, 80, dtype=torch.bool))


# -- measured choice (kernels="auto" on CUDA) -------------------------------------------------

def test_measured_choice_keeps_sdpa_where_the_kernel_is_slower(tmp_path, rng_inputs):
    """Real timings: on the CPU the interpreted kernel is far slower than SDPA, so every site
    stays SDPA, and the times are cached per site signature (one entry for two equal sites)."""
    from vdopt.kernels.selection import MeasuredChoice

    model = Blocks(SelfAttention(), SelfAttention(), SelfAttention(mask_mode="bool"), SelfAttention(causal=True))
    x = torch.randn(2, 33, 32, generator=rng_inputs)
    key_mask = torch.rand(2, 33, generator=rng_inputs) > 0.3
    gm = export(model, x, key_mask)
    cache = tmp_path / "choices.json"
    choose = MeasuredChoice(cache_path=cache, warmup=1, repeats=2)
    ctx = PassContext(mesh=Mesh(), device=torch.device("cpu"), kernels="triton")
    result = SdpaToTriton(choose=choose)(gm, ctx)

    assert not result.modified and count(gm, SDPA) == 4
    assert result.stats == {"lowered": 0, "kept_causal": 1, "kept_slower": 3}
    entries = json.loads(cache.read_text())
    assert len(entries) == 2  # unmasked and masked signatures; the second unmasked site reused it
    assert all(e["kernel_ms"] > e["sdpa_ms"] > 0 for e in entries.values())


def test_measured_choice_reads_the_cache_and_lowers_where_the_kernel_wins(tmp_path, rng_inputs):
    from vdopt.kernels.selection import MeasuredChoice, SiteInputs, site_key

    x = torch.randn(2, 20, 32, generator=rng_inputs)
    key_mask = torch.ones(2, 20, dtype=torch.bool)
    model = Blocks(SelfAttention())
    with torch.no_grad():
        ref = model(x, key_mask)
    gm = export(model, x, key_mask)
    (site,) = find_sdpa_sites(gm.graph)
    q, k, v = (site.node.args[i].meta["val"] for i in range(3))
    cache = tmp_path / "choices.json"
    # As a GPU run would have stored it: the kernel 2x faster for this exact signature.
    cache.write_text(json.dumps({site_key(SiteInputs(q=q, k=k, v=v, scale=site.scale)): {"sdpa_ms": 2.0, "kernel_ms": 1.0}}))
    ctx = PassContext(mesh=Mesh(), device=torch.device("cpu"), kernels="triton")
    result = SdpaToTriton(choose=MeasuredChoice(cache_path=cache))(gm, ctx)
    gm.recompile()
    assert result.stats["lowered"] == 1 and count(gm, SDPA) == 0
    with torch.no_grad():
        torch.testing.assert_close(gm(x, key_mask), ref, atol=1e-5, rtol=1e-5)

    # A corrupt cache is ignored with a warning and rewritten, never fatal.
    cache.write_text("{not json")
    gm = export(model, x, key_mask)
    result = SdpaToTriton(choose=MeasuredChoice(cache_path=cache, warmup=0, repeats=1))(gm, ctx)
    assert result.stats == {"lowered": 0, "kept_slower": 1}
    assert len(json.loads(cache.read_text())) == 1


def test_a_kernel_that_fails_to_time_keeps_sdpa(rng_inputs):
    def failing_choice(site):
        raise RuntimeError("triton compilation failed")  # what a broken kernel build raises

    x = torch.randn(1, 20, 32, generator=rng_inputs)
    gm = export(Blocks(SelfAttention()), x, torch.ones(1, 20, dtype=torch.bool))
    ctx = PassContext(mesh=Mesh(), device=torch.device("cpu"), kernels="triton")
    result = SdpaToTriton(choose=failing_choice)(gm, ctx)
    assert result.stats == {"lowered": 0, "kept_kernel_error": 1} and count(gm, SDPA) == 1
