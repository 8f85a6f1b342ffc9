"""Model zoo: tiny builds run, full configs have the published sizes, our models export."""

from __future__ import annotations

import pytest
import torch
from vdopt.models import build, get_spec, list_models

ALL = ["cogvideox", "latte", "opensora", "opensora_plan", "wan"]
OURS = ["opensora", "opensora_plan"]
SDPA = torch.ops.aten.scaled_dot_product_attention.default

# Parameters of the published checkpoints from their safetensors sizes: Latte-1 4.23 GB
# fp32, CogVideoX-2b 3.39 GB fp16, Wan2.1-T2V-1.3B 5.68 GB fp32, OpenSora-STDiT-v3 4.84 GB
# fp32 (which also stores the 300x4096 null-caption buffer), Open-Sora-Plan v1.3
# any93x640x640 11.09 GB fp32.
PUBLISHED_PARAMS = {
    "latte": 1.0575e9,
    "cogvideox": 1.695e9,
    "wan": 1.42e9,
    "opensora": 1.21e9 - 300 * 4096,
    "opensora_plan": 2.7725e9,
}


def sample(out) -> torch.Tensor:
    assert isinstance(out, tuple) and len(out) == 1
    return out[0]


def count_sdpa(ep) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target == SDPA)


def attention_modules(model: torch.nn.Module) -> int:
    """Attention modules of the model (diffusers' ``Attention``/``WanAttention``, our
    ``SelfAttention``/``CrossAttention``/``Attention``): each runs one SDPA per call."""
    return sum(1 for m in model.modules() if type(m).__name__.endswith("Attention"))


def layers(model: torch.nn.Module) -> int:
    config = model.config
    return config.depth if hasattr(config, "depth") else config.num_layers


def test_registry():
    assert list_models() == ALL
    for name in ALL:
        spec = get_spec(name)
        assert set(spec.sizes) == {"tiny", "full"}
    with pytest.raises(ValueError, match="unknown model"):
        build("sora")
    with pytest.raises(ValueError, match="unknown size"):
        build("wan", "huge")


@pytest.mark.parametrize("name", ALL)
def test_tiny_forward(name):
    model, args, kwargs = build(name)
    assert not model.training
    assert isinstance(kwargs["timestep"], torch.Tensor) and kwargs["timestep"].shape == (1,)
    latents = args[0]
    with torch.no_grad():
        out = sample(model(*args, **kwargs))
    assert torch.isfinite(out).all()

    spec = get_spec(name)
    shape = spec.default_shapes["tiny"]
    T, H, W = spec.patch_grid(shape.frames, shape.height, shape.width)
    # Axes that a rewrite could confuse must all differ.
    assert len({T, H * W, shape.text_len}) == 3, (T, H * W, shape.text_len)
    assert (T, H, W) == (3, 4, 6)
    if name == "cogvideox":  # frame-major latents (B, T, C, H, W), same layout out
        assert out.shape == latents.shape
    else:
        c_out = out.shape[1]
        assert out.shape == (1, c_out, 3, 8, 12)
        assert latents.shape[2:] == (3, 8, 12)


@pytest.mark.parametrize("name", ALL)
def test_uneven_grid_and_cfg_batch(name):
    # 3 frames x 3x5 patches = 45 tokens: divisible by neither 2 nor 4.
    frames = 3 if name == "latte" else 9
    spec = get_spec(name)
    assert spec.patch_grid(frames, 48, 80) == (3, 3, 5)
    model, args, kwargs = build(name, batch=2, frames=frames, height=48, width=80, text_len=7)
    assert kwargs["timestep"].shape == (2,)
    assert kwargs["encoder_hidden_states"].shape[:2] == (2, 7)
    with torch.no_grad():
        out = sample(model(*args, **kwargs))
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert out.shape[-2:] == (6, 10)


def test_bad_shape_is_value_error():
    with pytest.raises(ValueError, match="divisible"):
        build("wan", height=72)  # latent height 9 does not split into 2x2 patches


@pytest.mark.parametrize("name", ["opensora", "wan"])
def test_deterministic_and_rng_untouched(name):
    state = torch.random.get_rng_state()
    m1, a1, k1 = build(name, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    m2, a2, k2 = build(name, seed=3)
    m3, a3, _ = build(name, seed=4)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)
    assert torch.equal(a1[0], a2[0]) and not torch.equal(a1[0], a3[0])
    with torch.no_grad():
        assert torch.equal(sample(m1(*a1, **k1)), sample(m2(*a2, **k2)))


@pytest.mark.parametrize("name", ALL)
def test_full_param_count_on_meta(name):
    model, args, kwargs = build(name, "full", device="meta")
    assert args[0].is_meta
    n = sum(p.numel() for p in model.parameters())
    published = PUBLISHED_PARAMS[name]
    assert abs(n - published) / published < 0.01, f"{name}: {n:.4e} vs {published:.4e}"


def test_full_default_token_counts():
    spec = get_spec("wan")
    s = spec.default_shapes["full"]
    assert spec.patch_grid(s.frames, s.height, s.width) == (21, 30, 52)  # 32760 tokens
    spec = get_spec("cogvideox")
    s = spec.default_shapes["full"]
    assert spec.patch_grid(s.frames, s.height, s.width) == (13, 30, 45)  # 17550 + 226 text
    spec = get_spec("latte")
    s = spec.default_shapes["full"]
    assert spec.patch_grid(s.frames, s.height, s.width) == (16, 32, 32)


def test_full_configs_match_published():
    latte, _, _ = build("latte", "full", device="meta")
    assert (latte.config.num_layers, latte.config.num_attention_heads) == (28, 16)
    assert (latte.config.attention_head_dim, latte.config.video_length) == (72, 16)
    cog, _, kw = build("cogvideox", "full", device="meta")
    assert (cog.config.num_layers, cog.config.num_attention_heads, cog.config.time_embed_dim) == (
        30,
        30,
        512,
    )
    assert (cog.config.sample_frames, cog.config.sample_height, cog.config.sample_width) == (
        49,
        60,
        90,
    )
    assert cog.config.max_text_seq_length == kw["encoder_hidden_states"].shape[1] == 226
    wan, _, _ = build("wan", "full", device="meta")
    assert (wan.config.num_layers, wan.config.num_attention_heads, wan.config.ffn_dim) == (
        30,
        12,
        8960,
    )
    assert wan.config.qk_norm == "rms_norm_across_heads" and wan.config.cross_attn_norm
    osr, _, _ = build("opensora", "full", device="meta")
    assert (len(osr.spatial_blocks), len(osr.temporal_blocks), osr.config.hidden_size) == (
        28,
        28,
        1152,
    )
    plan, _, _ = build("opensora_plan", "full", device="meta")
    assert (len(plan.transformer_blocks), plan.config.hidden_size) == (32, 2304)


def test_bfloat16_keeps_diffusers_fp32_modules():
    model, args, kwargs = build("wan", dtype=torch.bfloat16)
    assert model.patch_embedding.weight.dtype == torch.bfloat16
    assert model.scale_shift_table.dtype == torch.float32  # in _keep_in_fp32_modules
    with torch.no_grad():
        out = sample(model(*args, **kwargs))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", OURS)
def test_text_mask_hides_padded_tokens(name):
    model, args, kwargs = build(name, batch=2, text_mask=True)
    mask = kwargs["encoder_attention_mask"]
    assert mask.shape == (2, 10) and (mask.sum(1) < 10).all() and (mask.sum(1) > 5).all()
    with torch.no_grad():
        ref = sample(model(*args, **kwargs))
        text = kwargs["encoder_hidden_states"].clone()
        text[mask == 0] = torch.randn_like(text[mask == 0])
        out = sample(model(*args, **{**kwargs, "encoder_hidden_states": text}))
        unmasked = sample(
            model(*args, **{k: v for k, v in kwargs.items() if k != "encoder_attention_mask"})
        )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked, ref)


def test_text_mask_rejected_where_unsupported():
    with pytest.raises(ValueError, match="text mask"):
        build("wan", text_mask=True)


@pytest.mark.parametrize(
    ("name", "text_mask"),
    [("opensora", False), ("opensora", True), ("opensora_plan", True)],
)
def test_export_keeps_sdpa_and_matches_eager(name, text_mask):
    model, args, kwargs = build(name, batch=2, text_mask=text_mask)
    ep = torch.export.export(model, args, kwargs, strict=False)
    # One SDPA node per attention module, and every layer has the same attention modules
    # (STDiT3: a spatial and a temporal block per depth, each self + cross; Open-Sora-Plan:
    # 3D self + cross per layer).
    expected = attention_modules(model)
    assert expected > 0 and expected % layers(model) == 0
    assert count_sdpa(ep) == expected
    with torch.no_grad():
        ref = sample(model(*args, **kwargs))
        out = sample(ep.module()(*args, **kwargs))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "per_layer"),
    [
        ("wan", 2),  # 3D self-attention + cross-attention
        ("cogvideox", 1),  # one joint text+video self-attention
        ("latte", 3),  # spatial self + cross, temporal self
    ],
)
def test_diffusers_models_export_with_sdpa(name, per_layer):
    model, args, kwargs = build(name)
    ep = torch.export.export(model, args, kwargs, strict=False)
    assert attention_modules(model) == per_layer * layers(model)
    assert count_sdpa(ep) == attention_modules(model)
