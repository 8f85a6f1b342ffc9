"""``vdopt.models.load_upstream``: released checkpoints' key names and configs onto our models.

The state dicts below have exactly the names and shapes the upstream modules produce,
written out from their ``__init__``s (upstream code cannot be imported here):

- Open-Sora 1.2, hpcaitech/Open-Sora at v1.2.0: ``opensora/models/stdit/stdit3.py``
  (``STDiT3.__init__``, ``STDiT3Block.__init__``, ``STDiT3Config``) and
  ``opensora/models/layers/blocks.py`` (``PatchEmbed3D``, ``TimestepEmbedder``,
  ``SizeEmbedder``, ``CaptionEmbedder``, ``Attention``, ``MultiHeadCrossAttention``,
  ``T2IFinalLayer``, ``LlamaRMSNorm``), timm's ``Mlp`` (fc1, fc2) and
  rotary_embedding_torch's ``RotaryEmbedding`` (its ``freqs`` parameter).
- Open-Sora-Plan v1.3, PKU-YuanGroup/Open-Sora-Plan: ``opensora/models/diffusion/
  opensora_v1_3/modeling_opensora.py`` (``OpenSoraT2V_v1_3._init_patched_inputs``,
  ``OpenSoraT2V_v1_3_2B_122``), ``opensora_v1_3/modules.py`` (``BasicTransformerBlock``,
  ``Attention`` = diffusers ``Attention``), ``common.py`` (``PatchEmbed2D``), and the
  diffusers modules they use (``PixArtAlphaTextProjection``, ``AdaLayerNormSingle``,
  ``FeedForward``). The Open-Sora-Plan table is also checked against those diffusers
  classes themselves.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from vdopt.models import load_upstream
from vdopt.models.opensora import STDIT3_CONFIGS, STDiT3Config
from vdopt.models.opensora_plan import OPENSORA_PLAN_CONFIGS
from vdopt.models.upstream import config_from_upstream

# ----------------------------------------------------------------------------- Open-Sora 1.2

# config.json of hpcai-tech/OpenSora-STDiT-v3 as transformers writes STDiT3Config (the
# STDiT3-XL/2 sizes), shrunk where marked.
STDIT3_TINY_CONFIG = {
    "architectures": ["STDiT3"],
    "caption_channels": 32,  # 4096
    "class_dropout_prob": 0.1,
    "depth": 2,  # 28
    "drop_path": 0.0,
    "enable_flash_attn": False,
    "enable_layernorm_kernel": False,
    "enable_sequence_parallelism": False,
    "freeze_y_embedder": True,
    "hidden_size": 64,  # 1152
    "in_channels": 4,
    "input_size": [None, None, None],
    "input_sq_size": 512,
    "mlp_ratio": 4.0,
    "model_max_length": 10,  # 300
    "model_type": "STDiT3",
    "num_heads": 4,  # 16
    "only_train_temporal": False,
    "patch_size": [1, 2, 2],
    "pred_sigma": True,
    "qk_norm": True,
    "skip_y_embedder": False,
    "torch_dtype": "float32",
    "transformers_version": "4.36.2",
}


def stdit3_upstream_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    C, heads, cap = c["hidden_size"], c["num_heads"], c["caption_channels"]
    D = C // heads
    hidden = int(C * c["mlp_ratio"])
    out = c["in_channels"] * (2 if c["pred_sigma"] else 1)
    lin = lambda name, o, i: {f"{name}.weight": (o, i), f"{name}.bias": (o,)}  # noqa: E731
    shapes = {
        "x_embedder.proj.weight": (C, c["in_channels"], *c["patch_size"]),  # PatchEmbed3D
        "x_embedder.proj.bias": (C,),
        **lin("t_embedder.mlp.0", C, 256), **lin("t_embedder.mlp.2", C, C),  # TimestepEmbedder
        **lin("fps_embedder.mlp.0", C, 256), **lin("fps_embedder.mlp.2", C, C),  # SizeEmbedder
        **lin("t_block.1", 6 * C, C),
        **lin("y_embedder.y_proj.fc1", C, cap), **lin("y_embedder.y_proj.fc2", C, C),  # CaptionEmbedder
        "y_embedder.y_embedding": (c["model_max_length"], cap),
        "rope.freqs": (D // 2,),  # RotaryEmbedding(dim=head_dim)
        **lin("final_layer.linear", math.prod(c["patch_size"]) * out, C),  # T2IFinalLayer
        "final_layer.scale_shift_table": (2, C),
    }
    for kind in ("spatial_blocks", "temporal_blocks"):
        for i in range(c["depth"]):
            b = f"{kind}.{i}"
            shapes.update({
                **lin(f"{b}.attn.qkv", 3 * C, C),  # Attention(qkv_bias=True)
                f"{b}.attn.q_norm.weight": (D,),  # LlamaRMSNorm (qk_norm)
                f"{b}.attn.k_norm.weight": (D,),
                **lin(f"{b}.attn.proj", C, C),
                **lin(f"{b}.cross_attn.q_linear", C, C),  # MultiHeadCrossAttention
                **lin(f"{b}.cross_attn.kv_linear", 2 * C, C),
                **lin(f"{b}.cross_attn.proj", C, C),
                **lin(f"{b}.mlp.fc1", hidden, C),  # timm Mlp
                **lin(f"{b}.mlp.fc2", C, hidden),
                f"{b}.scale_shift_table": (6, C),
            })
    return shapes


def stdit3_our_name(key: str) -> str | None:
    """Where each upstream tensor must land in our STDiT3 (None: not a parameter of ours)."""
    if key == "rope.freqs":
        return None
    return (
        key.replace("x_embedder.proj.", "x_embedder.")
        .replace("y_embedder.y_proj.", "y_embedder.")
        .replace("y_embedder.y_embedding", "y_embedding")
    )


def rope_freqs(dim: int, theta: float = 10000.0) -> torch.Tensor:
    """rotary_embedding_torch's ``freqs`` for ``freqs_for='lang'``."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))


# ----------------------------------------------------------------------------- Open-Sora-Plan v1.3

# config.json of the released OpenSoraT2V_v1_3-2B/122 checkpoints (every __init__ argument,
# as diffusers' register_to_config saves them; sizes from OpenSoraT2V_v1_3_2B_122, sparse
# settings from scripts/text_condition/gpu/train_t2v_v1_3.sh).
PLAN_RELEASED_CONFIG = {
    "_class_name": "OpenSoraT2V_v1_3",
    "_diffusers_version": "0.30.2",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 96,
    "caption_channels": 4096,
    "cross_attention_dim": 2304,
    "double_self_attention": False,
    "dropout": 0.0,
    "in_channels": 8,
    "interpolation_scale_h": 1.0,
    "interpolation_scale_t": 1.0,
    "interpolation_scale_w": 1.0,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "num_attention_heads": 24,
    "num_layers": 32,
    "only_cross_attention": False,
    "out_channels": 8,
    "patch_size": 2,
    "patch_size_t": 1,
    "sample_size_h": 44,
    "sample_size_t": 24,
    "sample_size_w": 80,
    "sparse1d": True,
    "sparse_n": 4,
    "upcast_attention": False,
}
PLAN_TINY_CONFIG = {
    **PLAN_RELEASED_CONFIG,
    "attention_head_dim": 24,
    "num_attention_heads": 4,
    "cross_attention_dim": 96,
    "caption_channels": 32,
    "num_layers": 4,
}


def plan_upstream_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    C = c["num_attention_heads"] * c["attention_head_dim"]
    p, pt = c["patch_size"], c["patch_size_t"]
    cross = c["cross_attention_dim"] or C
    lin = lambda name, o, i: {f"{name}.weight": (o, i), f"{name}.bias": (o,)}  # noqa: E731
    shapes = {
        **lin("caption_projection.linear_1", C, c["caption_channels"]),  # PixArtAlphaTextProjection
        **lin("caption_projection.linear_2", C, C),
        "pos_embed.proj.weight": (C, c["in_channels"], p, p),  # PatchEmbed2D (Conv2d)
        "pos_embed.proj.bias": (C,),
        "scale_shift_table": (2, C),
        **lin("proj_out", pt * p * p * c["out_channels"], C),
        **lin("adaln_single.emb.timestep_embedder.linear_1", C, 256),  # AdaLayerNormSingle
        **lin("adaln_single.emb.timestep_embedder.linear_2", C, C),
        **lin("adaln_single.linear", 6 * C, C),
    }
    for i in range(c["num_layers"]):
        b = f"transformer_blocks.{i}"
        for attn, kv_dim in (("attn1", C), ("attn2", cross)):  # diffusers Attention, bias=True
            shapes.update({
                **lin(f"{b}.{attn}.to_q", C, C),
                **lin(f"{b}.{attn}.to_k", C, kv_dim),
                **lin(f"{b}.{attn}.to_v", C, kv_dim),
                **lin(f"{b}.{attn}.to_out.0", C, C),
            })
        shapes.update({
            **lin(f"{b}.ff.net.0.proj", 4 * C, C),  # FeedForward("gelu-approximate")
            **lin(f"{b}.ff.net.2", C, 4 * C),
            f"{b}.scale_shift_table": (6, C),
        })
    return shapes


def plan_our_name(key: str) -> str:
    for old, new in (
        (r"^caption_projection\.linear_1\.", "caption_projection.fc1."),
        (r"^caption_projection\.linear_2\.", "caption_projection.fc2."),
        (r"^pos_embed\.proj\.", "patch_embed."),
        (r"^adaln_single\.emb\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0."),
        (r"^adaln_single\.emb\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2."),
        (r"^adaln_single\.linear\.", "t_block.1."),
        (r"\.to_out\.0\.", ".to_out."),
        (r"\.ff\.net\.0\.proj\.", ".ff.proj_in."),
        (r"\.ff\.net\.2\.", ".ff.proj_out."),
    ):
        key = re.sub(old, new, key)
    return key


def diffusers_skeleton_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """The same modules, built from the diffusers classes upstream instantiates."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import PixArtAlphaTextProjection
    from diffusers.models.normalization import AdaLayerNormSingle
    from torch import nn

    C = c["num_attention_heads"] * c["attention_head_dim"]
    p = c["patch_size"]

    def attention(cross):
        return Attention(
            query_dim=C, heads=c["num_attention_heads"], dim_head=c["attention_head_dim"],
            bias=c["attention_bias"], cross_attention_dim=cross, out_bias=True,
        )

    with torch.device("meta"):
        root = nn.Module()
        root.caption_projection = PixArtAlphaTextProjection(in_features=c["caption_channels"], hidden_size=C)
        root.pos_embed = nn.Module()
        root.pos_embed.proj = nn.Conv2d(c["in_channels"], C, kernel_size=p, stride=p)
        blocks = []
        for _ in range(c["num_layers"]):
            block = nn.Module()
            block.norm1 = nn.LayerNorm(C, elementwise_affine=False)
            block.attn1 = attention(None)
            block.norm2 = nn.LayerNorm(C, elementwise_affine=False)
            block.attn2 = attention(c["cross_attention_dim"])
            block.ff = FeedForward(C, activation_fn=c["activation_fn"])
            block.scale_shift_table = nn.Parameter(torch.empty(6, C))
            blocks.append(block)
        root.transformer_blocks = nn.ModuleList(blocks)
        root.norm_out = nn.LayerNorm(C, elementwise_affine=False)
        root.scale_shift_table = nn.Parameter(torch.empty(2, C))
        root.proj_out = nn.Linear(C, c["patch_size_t"] * p * p * c["out_channels"])
        root.adaln_single = AdaLayerNormSingle(C)
    return {k: tuple(v.shape) for k, v in root.state_dict().items()}


# ----------------------------------------------------------------------------- helpers


def random_state(shapes: dict, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def stdit3_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    state = random_state(stdit3_upstream_shapes(STDIT3_TINY_CONFIG), g)
    state["rope.freqs"] = rope_freqs(STDIT3_TINY_CONFIG["hidden_size"] // STDIT3_TINY_CONFIG["num_heads"])
    return state


def assert_every_parameter_assigned(model, state, our_name) -> None:
    ours = model.state_dict()
    used = set()
    for key, tensor in state.items():
        name = our_name(key)
        if name is None:
            continue
        assert name in ours, key
        want = tensor.unsqueeze(2) if key == "pos_embed.proj.weight" else tensor
        assert torch.equal(ours[name], want), key
        used.add(name)
    assert used == set(ours), set(ours) - used
    assert not any(t.is_meta for t in ours.values())


# ----------------------------------------------------------------------------- tests


def test_plan_table_matches_the_diffusers_modules_upstream_uses():
    for config in (PLAN_TINY_CONFIG, PLAN_RELEASED_CONFIG):
        assert diffusers_skeleton_shapes(config) == plan_upstream_shapes(config)


def test_released_configs_give_the_full_zoo_configs():
    assert config_from_upstream("opensora_plan", PLAN_RELEASED_CONFIG) == OPENSORA_PLAN_CONFIGS["full"]
    released = {**STDIT3_TINY_CONFIG, "caption_channels": 4096, "depth": 28, "hidden_size": 1152,
                "model_max_length": 300, "num_heads": 16}
    assert config_from_upstream("opensora", released) == STDIT3_CONFIGS["full"]


def test_load_opensora_plan(rng_inputs):
    state = random_state(plan_upstream_shapes(PLAN_TINY_CONFIG), rng_inputs)
    model = load_upstream("opensora_plan", state, PLAN_TINY_CONFIG)
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.sparse1d, cfg.sparse_n) == (4, 96, True, 4)
    assert [b.skiparse is not None for b in model.transformer_blocks] == [False, False, True, True]
    assert_every_parameter_assigned(model, state, plan_our_name)
    assert not model.training
    g = rng_inputs
    with torch.no_grad():
        out = model(torch.randn(1, 8, 3, 8, 12, generator=g), torch.tensor([500.0]),
                    torch.randn(1, 10, 32, generator=g), return_dict=False)[0]
    assert out.shape == (1, 8, 3, 8, 12) and torch.isfinite(out).all()


def test_load_opensora_stdit3(rng_inputs):
    state = stdit3_state(rng_inputs)
    model = load_upstream("opensora", state, STDIT3_TINY_CONFIG)
    assert model.config == STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=10)
    assert_every_parameter_assigned(model, state, stdit3_our_name)


def test_load_from_files(tmp_path, rng_inputs):
    from safetensors.torch import save_file

    state = random_state(plan_upstream_shapes(PLAN_TINY_CONFIG), rng_inputs)
    (tmp_path / "config.json").write_text(json.dumps(PLAN_TINY_CONFIG))
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    torch.save(state, tmp_path / "ema.pt")
    for weights, config in (
        (tmp_path, tmp_path),  # a checkpoint folder, as released
        (tmp_path / "ema.pt", tmp_path / "config.json"),
        (str(tmp_path / "diffusion_pytorch_model.safetensors"), str(tmp_path)),
    ):
        assert_every_parameter_assigned(load_upstream("opensora_plan", weights, config), state, plan_our_name)


def test_missing_unexpected_and_misshaped_keys_are_listed(rng_inputs):
    state = random_state(plan_upstream_shapes(PLAN_TINY_CONFIG), rng_inputs)
    broken = {k: v for k, v in state.items() if not k.endswith("attn1.to_q.weight")}
    del broken["adaln_single.linear.bias"]
    broken["transformer_blocks.0.attn1.norm_q.weight"] = torch.ones(24)
    broken["patch_embed.weight"] = torch.ones(96, 8, 1, 2, 2)  # our name, not upstream's
    broken["scale_shift_table"] = torch.ones(3, 96)
    with pytest.raises(ValueError) as err:
        load_upstream("opensora_plan", broken, PLAN_TINY_CONFIG)
    message = str(err.value)
    assert "missing keys (upstream names):" in message
    assert "transformer_blocks.{0-3}.attn1.to_q.weight" in message
    assert "adaln_single.linear.bias" in message
    assert "unexpected keys:" in message
    assert "transformer_blocks.0.attn1.norm_q.weight" in message and "patch_embed.weight" in message
    assert "scale_shift_table: (3, 96) in the checkpoint, (2, 96) in the model" in message

    state = stdit3_state(rng_inputs)
    del state["temporal_blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing keys.*\n    temporal_blocks\.1\.mlp\.fc2\.bias"):
        load_upstream("opensora", state, STDIT3_TINY_CONFIG)


def test_configs_we_cannot_compute_are_refused():
    state = random_state(plan_upstream_shapes(PLAN_TINY_CONFIG), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="activation_fn"):
        load_upstream("opensora_plan", state, {**PLAN_TINY_CONFIG, "activation_fn": "geglu"})
    with pytest.raises(ValueError, match="in_channels"):
        config_from_upstream("opensora_plan", {k: v for k, v in PLAN_TINY_CONFIG.items() if k != "in_channels"})
    with pytest.raises(ValueError, match="rope.freqs"):
        load_upstream("opensora", {"rope.freqs": torch.ones(8)}, STDIT3_TINY_CONFIG)
    with pytest.raises(ValueError, match="known: opensora, opensora_plan"):
        load_upstream("wan", state, PLAN_TINY_CONFIG)
