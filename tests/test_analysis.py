"""Attention analysis: kinds derived from graph structure, on the zoo and unseen models."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import vdopt
from vdopt.models import build

import unseen_models


def kinds(sites) -> dict[str, int]:
    return dict(Counter(s.kind for s in sites))


def layers(model) -> int:
    config = model.config
    return config.depth if hasattr(config, "depth") else config.num_layers


@pytest.mark.parametrize(
    "name, expected",
    [
        ("latte", lambda L: {"spatial": L, "temporal": L, "cross": L}),
        ("wan", lambda L: {"full": L, "cross": L}),
        ("cogvideox", lambda L: {"joint_text": L}),
        ("opensora", lambda L: {"spatial": L, "temporal": L, "cross": 2 * L}),
        ("opensora_plan", lambda L: {"full": L, "cross": L}),
    ],
)
def test_zoo_kind_counts(name, expected):
    model, args, kwargs = build(name, "tiny")
    sites = vdopt.inspect(model, *args, **kwargs)
    assert kinds(sites) == expected(layers(model))
    for s in sites:
        assert s.heads > 0 and s.head_dim > 0 and s.q_len > 0 and s.kv_len > 0
        assert s.block is not None


def test_latte_sites_have_the_right_shapes_and_blocks():
    model, args, kwargs = build("latte", "tiny")
    lat = args[0]
    frames, spatial = lat.shape[2], (lat.shape[3] // 2) * (lat.shape[4] // 2)
    text = kwargs["encoder_hidden_states"].shape[1]
    sites = vdopt.inspect(model, *args, **kwargs)
    by_kind = {k: [s for s in sites if s.kind == k] for k in ("spatial", "temporal", "cross")}
    assert {(s.q_len, s.kv_len, s.batch) for s in by_kind["spatial"]} == {(spatial, spatial, frames)}
    assert {(s.q_len, s.kv_len, s.batch) for s in by_kind["temporal"]} == {(frames, frames, spatial)}
    assert {(s.q_len, s.kv_len) for s in by_kind["cross"]} == {(spatial, text)}
    assert {s.axes for s in by_kind["temporal"]} == {("T",)}
    assert [s.block for s in by_kind["spatial"]] == [f"transformer_blocks.{i}" for i in range(layers(model))]
    assert [s.block for s in by_kind["temporal"]] == [f"temporal_transformer_blocks.{i}" for i in range(layers(model))]
    assert len({s.name for s in sites}) == len(sites)


def test_unseen_hunyuan_video_joint_text_and_text_refiner():
    model, args, kwargs = unseen_models.hunyuan_video()
    sites = vdopt.inspect(model, *args, **kwargs)
    # double-stream and single-stream blocks attend jointly over video and text tokens; the
    # token refiner's blocks attend over text only
    config = model.config
    assert kinds(sites) == {"joint_text": config.num_layers + config.num_single_layers, "text": config.num_refiner_layers}
    _, _, T, H, W = kwargs["hidden_states"].shape
    p, pt = config.patch_size, config.patch_size_t
    video_tokens = (T // pt) * (H // p) * (W // p)
    joint = [s for s in sites if s.kind == "joint_text"]
    assert {s.q_len for s in joint} == {video_tokens + kwargs["encoder_hidden_states"].shape[1]}
    assert all(s.has_mask for s in sites)


def test_unseen_pixart_image_model_is_spatial_and_cross():
    model, args, kwargs = unseen_models.pixart()
    L = model.config.num_layers
    assert kinds(vdopt.inspect(model, *args, **kwargs)) == {"spatial": L, "cross": L}


class NamelessSpatioTemporal(torch.nn.Module):
    """A model with no telling module names: kinds must come from the graph alone."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Conv3d(4, dim, (1, 2, 2), stride=(1, 2, 2))
        self.a = torch.nn.Linear(dim, 3 * dim)
        self.b = torch.nn.Linear(dim, 3 * dim)
        self.c_q = torch.nn.Linear(dim, dim)
        self.c_kv = torch.nn.Linear(8, 2 * dim)

    def attend(self, x, proj):  # x: (B', S, C)
        q, k, v = proj(x).chunk(3, dim=-1)
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)

    def forward(self, hidden_states, context):
        x = self.embed(hidden_states)  # (B, C, T, H, W)
        B, C, T, H, W = x.shape
        x = x.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)
        x = x + self.attend(x, self.a)  # over H*W
        x = x.reshape(B, T, H * W, C).transpose(1, 2).reshape(B * H * W, T, C)
        x = x + self.attend(x, self.b)  # over T
        x = x.reshape(B, H * W, T, C).transpose(1, 2).reshape(B, T * H * W, C)
        q = self.c_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.c_kv(context).chunk(2, -1))
        return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def test_kinds_come_from_structure_not_names():
    model = NamelessSpatioTemporal().eval()
    x, ctx = torch.randn(1, 4, 5, 6, 4), torch.randn(1, 7, 8)
    sites = vdopt.inspect(model, x, ctx)
    T, HW, text = x.shape[2], (x.shape[3] // 2) * (x.shape[4] // 2), ctx.shape[1]  # (1, 2, 2) patches
    assert [(s.kind, s.q_len, s.kv_len) for s in sites] == [("spatial", HW, HW), ("temporal", T, T), ("cross", T * HW, text)]
    out = vdopt.optimize(model)(x, ctx)
    torch.testing.assert_close(out, model(x, ctx), rtol=1e-6, atol=1e-6)


def test_block_tags_name_the_transformer_block_not_a_nested_list_entry():
    from vdopt import meta
    from vdopt.capture import bind_call, capture
    from vdopt.passes.analysis.attention import analyze

    model, args, kwargs = build("latte", "tiny")
    gm = capture(model, bind_call(model, args, kwargs))
    analyze(gm)
    tags = {n.meta.get(meta.BLOCK) for n in gm.graph.nodes if "to_out" in str(n.meta.get("nn_module_stack", ""))}
    L = layers(model)
    assert tags == {f"transformer_blocks.{i}" for i in range(L)} | {f"temporal_transformer_blocks.{i}" for i in range(L)}


class PackedTokens(torch.nn.Module):
    """Pre-patchified tokens (B, L, C), a linear patch embedding, text joined in front of the
    video tokens in self-attention, and no convolution anywhere."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Linear(12, dim)
        self.text = torch.nn.Linear(8, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, 12)

    def forward(self, tokens, context):
        x, t = self.embed(tokens), self.text(context)
        joint = torch.cat([t, x], dim=1)
        q, k, v = (u.unflatten(-1, (self.heads, -1)).transpose(1, 2) for u in self.qkv(joint).chunk(3, -1))
        y = joint + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.out(y[:, t.shape[1]:])


def _origin(model, args, kwargs):
    from vdopt.capture import bind_call, capture
    from vdopt.passes.analysis.attention import SDPA, analyze, depends_on_latent
    from vdopt.passes.analysis.tokens import find_token_origin

    gm = capture(model, bind_call(model, args, kwargs))
    analyze(gm)
    sdpas = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
    return find_token_origin(sdpas, depends_on_latent(gm.graph))


def test_token_dim_of_pre_patchified_tokens_is_found_from_the_qkv_shape_flow():
    """No convolution: the tokens are created by the input itself (dim 1 of the placeholder);
    the text rows joined in front do not count."""
    origin = _origin(PackedTokens().eval(), (torch.randn(1, 15, 12), torch.randn(1, 7, 8)), {})
    assert origin.node.op == "placeholder" and origin.node.name == "tokens"
    assert (origin.dim, origin.size, origin.grid) == (1, 15, ())


def test_token_dim_of_a_conv_patch_embedding_is_its_flatten_with_the_grid():
    model, args, kwargs = build("wan", "tiny", frames=5, height=48, width=80)
    origin = _origin(model, args, kwargs)
    T, H, W = 2, 3, 5  # Wan VAE: 4x temporal (1 + 4k frames), 8x spatial, (1, 2, 2) patches
    assert origin.size == T * H * W and origin.grid == (T, H, W)
