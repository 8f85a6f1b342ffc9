"""The model matrix: every diffusers transformer class a video pipeline uses, plus image DiTs.

Enumeration (no hand list): every ``diffusers`` pipeline class whose ``__init__`` annotations
name a transformer class (a ``ModelMixin`` subclass whose name contains ``Transformer``) is
read; the pipeline is a *video* pipeline when the output dataclass its ``__call__`` returns
has a ``frames`` field (diffusers' video outputs all carry ``frames``; image outputs carry
``images``, audio ``audios``). A class is in the ``video`` group when at least one video
pipeline uses it. The ``image`` group is the four image DiTs of issue 12 (Flux, SD3,
PixArt, Sana): a DiT is a DiT.

Tiny configs are derived from the class's ``__init__`` defaults, shrunk by parameter name
(heads 2, head dim 16, one layer of each stack, text/conditioning widths 32, which also equals
the inner width where a constructor needs them equal); rotary axis splits whose sum is the
head dim are re-split for the new head dim. ``CONFIG_OVERRIDES`` holds the few constructor
constraints a generic shrink cannot meet, each with why.

Inputs come from the forward signature and the config: a latent of 3 frames x 6 x 10 (8 x 12
for 2-D models), other than any config sample size, text of 5 tokens, timesteps in [0, 1000].
``INPUT_LAYOUT`` holds the declarative per-class input hints, as diffusers' own tests know how
to call each class: a latent that is not ``(B, C, [T,] H, W)`` (packed tokens, frames first,
channels last, its channel count or size) and the arguments the class's pipeline passes
beyond latent, text and timestep (audio streams, pose and face inputs, history latents,
chunk partitions, per-frame timesteps), each mirroring the pipeline in ``diffusers/pipelines``.

``EXPECTED`` is the declared outcome of each (class, strategy) cell: ``"pass"`` or an xfail
reason. The test (``tests/test_matrix.py``) checks every cell against it (strict xfails),
and ``support_table`` renders it for the README, so the table cannot drift from the suite.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import typing

import torch

STRATEGIES = ("single", "ulysses2", "ring2", "cfg2", "pab", "save_load")
"""Columns of the matrix: one device, 2-rank Ulysses / Ring / CFG, PAB, AOTInductor save+load."""

IMAGE_CLASSES = ("FluxTransformer2DModel", "SD3Transformer2DModel", "PixArtTransformer2DModel",
                 "SanaTransformer2DModel")
"""The image DiTs of the matrix (issue 12, item 5)."""

SAVE_LOAD = ("WanTransformer3DModel", "FluxTransformer2DModel")
"""Save/load (AOTInductor, tens of seconds per package on CPU) runs for a representative subset
only: one video model with a convolution patch embedding, one image model with packed latents."""

FRAMES, HEIGHT, WIDTH = 3, 6, 10
"""Latent size of the 3-D calls (other than any config's sample size); 2-D calls use 8 x 12."""
TEXT_LEN = 5

HEADS, HEAD_DIM, WIDTH_TEXT = 2, 16, 32


# -- enumeration ---------------------------------------------------------------------------
def _transformer_annotations(pipeline_cls) -> list[type]:
    from diffusers.models.modeling_utils import ModelMixin

    try:
        hints = typing.get_type_hints(pipeline_cls.__init__)
    except Exception:  # an annotation that names a missing optional dependency
        hints = {p.name: p.annotation for p in inspect.signature(pipeline_cls.__init__).parameters.values()}
    found = []
    for hint in hints.values():
        for cls in (hint, *typing.get_args(hint)):
            if inspect.isclass(cls) and issubclass(cls, ModelMixin) and "Transformer" in cls.__name__:
                found.append(cls)
    return found


def _is_video_pipeline(pipeline_cls) -> bool:
    try:
        ret = typing.get_type_hints(pipeline_cls.__call__).get("return")
    except Exception:
        return False
    for cls in (ret, *typing.get_args(ret)):
        if inspect.isclass(cls) and dataclasses.is_dataclass(cls):
            if "frames" in {f.name for f in dataclasses.fields(cls)}:
                return True
    return False


@functools.cache
def video_transformer_classes() -> tuple[str, ...]:
    """Names of the transformer classes that at least one video pipeline of diffusers uses."""
    import diffusers
    from diffusers import DiffusionPipeline

    names = set()
    for name in dir(diffusers):
        if not name.endswith("Pipeline"):
            continue
        try:
            cls = getattr(diffusers, name)
        except Exception:  # a pipeline whose optional dependency is missing
            continue
        if inspect.isclass(cls) and issubclass(cls, DiffusionPipeline) and _is_video_pipeline(cls):
            names.update(c.__name__ for c in _transformer_annotations(cls))
    return tuple(sorted(names))


def matrix_classes() -> list[tuple[str, str]]:
    """``(group, class name)`` of every row: the video classes, then the image DiTs."""
    return [("video", n) for n in video_transformer_classes()] + [("image", n) for n in IMAGE_CLASSES]


# -- tiny configs --------------------------------------------------------------------------
_ONE_LAYER = ("num_layers", "num_single_layers", "num_refiner_layers", "mmdit_layers", "num_blocks",
              "num_double_layers", "num_transformer_layers", "depth", "num_visual_blocks", "num_text_blocks",
              "num_hidden_layers", "num_decoder_layers")
_TEXT_WIDTHS = ("cross_attention_dim", "caption_channels", "text_dim", "text_embed_dim", "text_embed_dim_t5",
                "joint_attention_dim", "pooled_projection_dim", "encoder_hidden_states_channels",
                "crossattn_proj_in_channels", "text_hidden_dim", "caption_projection_dim", "image_dim",
                "img_context_dim_in", "cond_proj_dim", "audio_cross_attention_dim", "caption_dim", "in_text_dim",
                "in_text_dim2", "text_embed_2_dim", "image_embed_dim")
_SMALL = {"ffn_dim": 64, "freq_dim": 32, "time_embed_dim": 32, "adaln_lora_dim": 8, "num_cross_attention_heads": HEADS,
          "cross_attention_head_dim": HEAD_DIM, "img_context_num_tokens": 4, "img_context_dim_out": WIDTH_TEXT,
          "max_sequence_length": 16, "num_kv_heads": HEADS, "audio_num_attention_heads": HEADS,
          "audio_attention_head_dim": HEAD_DIM, "model_dim": HEADS * HEAD_DIM, "ff_dim": 64, "time_dim": 32,
          "hidden_size": HEADS * HEAD_DIM, "head_dim": HEAD_DIM, "intermediate_size": 64, "num_key_value_heads": HEADS}


def _rope_split(n: int) -> tuple[int, ...]:
    """``n`` even parts summing to HEAD_DIM, the later ones larger (as in published splits)."""
    base = (HEAD_DIM // n) // 2 * 2
    parts = [base] * n
    parts[-1] += HEAD_DIM - sum(parts)
    return tuple(parts)


def tiny_config(cls) -> dict:
    """``cls``'s ``__init__`` defaults shrunk by parameter name, then ``CONFIG_OVERRIDES``."""
    params = inspect.signature(cls.__init__).parameters
    head_dim_default = next((params[k].default for k in ("attention_head_dim", "head_dim") if k in params), None)
    config = {}
    for name, p in params.items():
        if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = p.default
        if name == "num_attention_heads":
            config[name] = HEADS
        elif name == "attention_head_dim":
            config[name] = HEAD_DIM
        elif name in _ONE_LAYER and isinstance(default, int):
            config[name] = 1
        elif name in _TEXT_WIDTHS and isinstance(default, int) and default > 0:
            config[name] = WIDTH_TEXT
        elif name in _SMALL and isinstance(default, int):
            config[name] = _SMALL[name]
        elif (isinstance(default, (tuple, list)) and default and all(isinstance(x, int) for x in default)
              and len(default) > 1 and (sum(default) == head_dim_default or "axes_dim" in name)):
            config[name] = _rope_split(len(default))  # rotary axes splitting the head dim
    config.update(CONFIG_OVERRIDES.get(cls.__name__, {}))
    return config


CONFIG_OVERRIDES: dict[str, dict] = {
    # in_channels and patch_size default to None: the constructor needs values.
    "EasyAnimateTransformer3DModel": dict(in_channels=4, out_channels=4, patch_size=2),
    # in_channels/sample_size/patch_size default to None; video_length sizes the temporal
    # position table, which must equal the call's frame count.
    "LatteTransformer3DModel": dict(in_channels=4, out_channels=8, sample_size=8, patch_size=2, caption_channels=WIDTH_TEXT,
                                    norm_type="ada_norm_single", num_embeds_ada_norm=1000, video_length=FRAMES),
    # vace_layers index the transformer blocks: only block 0 exists in the tiny model.
    "WanVACETransformer3DModel": dict(vace_layers=[0], vace_in_channels=8),
    # max_text_seq_length sizes the joint text+video position table: it must equal the call's
    # text length (the pipeline pads prompts to it).
    "CogVideoXTransformer3DModel": dict(max_text_seq_length=TEXT_LEN),
    # caption_channels defaults to None (no caption projection); PixArt checkpoints have one.
    # sample_size 128 (the default) turns on PixArt-Alpha's micro-conditions, whose embedding
    # splits the inner width in three: 64 is PixArt-Sigma's setting (no micro-conditions).
    "PixArtTransformer2DModel": dict(caption_channels=WIDTH_TEXT, sample_size=64),
    # concat_padding_mask resizes the mask with torchvision, which this environment lacks.
    "CosmosTransformer3DModel": dict(concat_padding_mask=False),
    # FramePack checkpoints project SigLIP image tokens and embed the clean history latents
    # (both off by default; the pipeline always passes them).
    "HunyuanVideoFramepackTransformer3DModel": dict(has_image_proj=True, image_proj_dim=WIDTH_TEXT,
                                                    has_clean_x_embedder=True),
    # The motion encoder's input size keys its channel table (512 px by default): 16 px with
    # three entries; one face adapter per block (the default, every 5th, needs 5 blocks).
    "WanAnimateTransformer3DModel": dict(motion_encoder_size=16, motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8},
                                         motion_style_dim=16, motion_dim=8, motion_encoder_dim=WIDTH_TEXT,
                                         face_encoder_hidden_dim=16, face_encoder_num_heads=2,
                                         inject_face_latents_blocks=1),
    # 128 latent channels by default (video and audio): 8 keeps the tiny model tiny.
    "LTX2VideoTransformer3DModel": dict(in_channels=8, out_channels=8, audio_in_channels=8, audio_out_channels=8),
    # linear_head_dim (the linear-attention blocks' head width, 112) must equal the head dim.
    "SanaWMTransformer3DModel": dict(in_channels=8, linear_head_dim=HEAD_DIM),
    # Super-resolution: the output width is the input's (noisy latent) width.
    "Kandinsky6SRTransformer3DModel": dict(in_visual_dim=4, out_visual_dim=4),
}
"""Per class, constructor constraints a generic shrink cannot meet (each entry says why)."""


def build_model(name: str, seed: int = 0) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**tiny_config(cls))
        # Zero-initialized gates and modulations (adaLN-Zero, output projections) would make a
        # block's attention not reach the output, and every comparison through it vacuous.
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() and not p.any():
                    p.normal_(0.0, 0.2)
    return model.eval()


# -- inputs --------------------------------------------------------------------------------
_TEXT_INPUTS = ("encoder_hidden_states", "encoder_hidden_states_t5", "encoder_hidden_states_2",
                "text_embeds", "prompt_embeds")
_POOLED_INPUTS = ("pooled_projections", "pooled_text_embeds")

def _ids(n_rows: int, cols: int = 3) -> torch.Tensor:
    """Position ids like the pipelines make: row index in column 1, column index in column 2."""
    ids = torch.zeros(n_rows, cols)
    ids[:, 1] = torch.arange(n_rows) // 12
    ids[:, 2] = torch.arange(n_rows) % 12
    return ids


INPUT_LAYOUT: dict[str, dict] = {
    # The latent is (B, T, C, H, W): frames before channels.
    "CogVideoXTransformer3DModel": dict(frames_first=True),
    # Packed latents: (B, T*H*W, C) tokens plus the grid sizes as ints.
    "LTXVideoTransformer3DModel": dict(packed=True, extra=dict(
        num_frames=lambda b, kw, m, g: FRAMES, height=lambda b, kw, m, g: HEIGHT, width=lambda b, kw, m, g: WIDTH)),
    # Packed latents: (B, H*W, C) tokens plus position ids of image and text tokens.
    "FluxTransformer2DModel": dict(packed=True, extra=dict(
        img_ids=lambda b, kw, m, g: _ids(8 * 12), txt_ids=lambda b, kw, m, g: torch.zeros(TEXT_LEN, 3))),
    # adaln_single takes the micro-conditions as a dict (None: PixArt-Sigma has none).
    "PixArtTransformer2DModel": dict(extra=dict(
        added_cond_kwargs=lambda b, kw, m, g: {"resolution": None, "aspect_ratio": None})),
    # Frames first, and a timestep per frame: (B, T).
    "AnyFlowTransformer3DModel": dict(frames_first=True, extra=dict(
        timestep=lambda b, kw, m, g: torch.rand(b, FRAMES, generator=g) * 1000,
        r_timestep=lambda b, kw, m, g: torch.rand(b, FRAMES, generator=g) * 1000)),
    # Channels-last latent (B, T, H, W, C) plus the rotary positions the pipeline makes: an
    # arange per axis of the (T, H/2, W/2) patch grid, and one over the text tokens.
    "Kandinsky5Transformer3DModel": dict(channels_last=True, extra=dict(
        visual_rope_pos=lambda b, kw, m, g: [torch.arange(FRAMES), torch.arange(HEIGHT // 2), torch.arange(WIDTH // 2)],
        text_rope_pos=lambda b, kw, m, g: torch.arange(TEXT_LEN))),
    # Image-to-video: SigLIP image tokens (B, 4, image_embed_dim) and the glyph text encoder's
    # states (B, L, text_embed_2_dim) with its mask, next to the text.
    "HunyuanVideo15Transformer3DModel": dict(extra=dict(
        image_embeds=lambda b, kw, m, g: torch.randn(b, 4, WIDTH_TEXT, generator=g),
        encoder_hidden_states_2=lambda b, kw, m, g: torch.randn(b, TEXT_LEN, WIDTH_TEXT, generator=g),
        encoder_attention_mask_2=lambda b, kw, m, g: torch.ones(b, TEXT_LEN))),
    # Frames first (B, T, C, H, W) with a timestep per frame, cut into causal chunks of 1 and 2
    # frames (the pipeline's chunk_partition); no KV cache: the whole-sequence rollout with its
    # causal block mask, and no clean context frames (clean_timestep goes with them).
    "AnyFlowFARTransformer3DModel": dict(frames_first=True, extra=dict(
        chunk_partition=lambda b, kw, m, g: [1, FRAMES - 1],
        timestep=lambda b, kw, m, g: torch.rand(b, FRAMES, generator=g) * 1000,
        r_timestep=lambda b, kw, m, g: torch.rand(b, FRAMES, generator=g) * 1000,
        clean_timestep=lambda b, kw, m, g: None)),
    # FramePack (vanilla sampling, as the pipeline calls it): the latent window's frame
    # indices, SigLIP image tokens, and clean history latents at 1x (the image frame and one
    # history frame), 2x (2 frames) and 4x (4 frames), each with its frame indices.
    "HunyuanVideoFramepackTransformer3DModel": dict(extra=dict(
        image_embeds=lambda b, kw, m, g: torch.randn(b, 4, WIDTH_TEXT, generator=g),
        indices_latents=lambda b, kw, m, g: torch.arange(8, 8 + FRAMES),
        latents_clean=lambda b, kw, m, g: torch.randn(b, m.config.in_channels, 2, HEIGHT, WIDTH, generator=g),
        indices_latents_clean=lambda b, kw, m, g: torch.tensor([0, 7]),
        latents_history_2x=lambda b, kw, m, g: torch.randn(b, m.config.in_channels, 2, HEIGHT, WIDTH, generator=g),
        indices_latents_history_2x=lambda b, kw, m, g: torch.arange(5, 7),
        latents_history_4x=lambda b, kw, m, g: torch.randn(b, m.config.in_channels, 4, HEIGHT, WIDTH, generator=g),
        indices_latents_history_4x=lambda b, kw, m, g: torch.arange(1, 5))),
    # Channels-last (B, T, H, W, C): the noisy latent, the conditioning latent and its mask
    # concatenated on the channels (2C + 1), as the pipelines build them.
    "Kandinsky6Transformer3DModel": dict(channels_last=True, channels=lambda m: 2 * m.config.in_visual_dim + 1),
    # The same layout for super-resolution tiles (noisy latent, anchor, anchor mask); NABLA
    # attention groups 8 x 8 token blocks, so the grid is 8 x 16 tokens (patch 1).
    "Kandinsky6SRTransformer3DModel": dict(channels_last=True, channels=lambda m: 2 * m.config.in_visual_dim + 1,
                                           size=(FRAMES, 8, 16)),
    # Packed video tokens (B, T*H*W, C) with the grid as ints, and the audio stream: packed
    # audio latents (B, 7, C_audio), its text states and frame count, as the pipeline passes.
    "LTX2VideoTransformer3DModel": dict(packed=True, extra=dict(
        audio_hidden_states=lambda b, kw, m, g: torch.randn(b, 7, m.config.audio_in_channels, generator=g),
        audio_encoder_hidden_states=lambda b, kw, m, g: torch.randn(b, TEXT_LEN, WIDTH_TEXT, generator=g),
        num_frames=lambda b, kw, m, g: FRAMES, height=lambda b, kw, m, g: HEIGHT, width=lambda b, kw, m, g: WIDTH,
        audio_num_frames=lambda b, kw, m, g: 7)),
    # World model: a timestep per frame (B, 1, T), text states (B, 1, L, D) and the text
    # padding mask (the pipeline passes it as ``mask``; two padded tokens).
    "SanaWMTransformer3DModel": dict(extra=dict(
        timestep=lambda b, kw, m, g: torch.rand(b, 1, FRAMES, generator=g) * 1000,
        encoder_hidden_states=lambda b, kw, m, g: torch.randn(b, 1, TEXT_LEN, WIDTH_TEXT, generator=g),
        mask=lambda b, kw, m, g: (torch.arange(TEXT_LEN) < TEXT_LEN - 2).float().expand(b, TEXT_LEN).clone())),
    # Animate: the latent carries 2C + 4 channels (in_channels) and one frame more than the
    # pose latents (B, C, T - 1, H, W); the face video (B, 3, 4(T - 2) + 1, S, S) at the motion
    # encoder's size S, whose causal convolutions give T - 1 face tokens; CLIP image tokens.
    "WanAnimateTransformer3DModel": dict(extra=dict(
        pose_hidden_states=lambda b, kw, m, g: torch.randn(b, m.config.latent_channels, FRAMES - 1, HEIGHT, WIDTH,
                                                           generator=g),
        face_pixel_values=lambda b, kw, m, g: torch.randn(b, 3, 4 * (FRAMES - 2) + 1, m.config.motion_encoder_size,
                                                          m.config.motion_encoder_size, generator=g),
        encoder_hidden_states_image=lambda b, kw, m, g: torch.randn(b, 4, m.config.image_dim, generator=g))),
    # VACE control latents: (B, vace_in_channels, T, H, W).
    "WanVACETransformer3DModel": dict(extra=dict(
        control_hidden_states=lambda b, kw, m, g: torch.randn(b, 8, FRAMES, HEIGHT, WIDTH, generator=g))),
}
"""Per class, how its call differs from ``(B, C, [T,] H, W)`` latents plus text (each says why)."""


def _latent_channels(config: dict, model) -> int:
    cfg = dict(model.config)
    for key in ("in_channels", "in_visual_dim", "latent_channel", "in_dim"):
        if cfg.get(key):
            return int(cfg[key])
    raise KeyError("no input channel count in the config")


def make_inputs(name: str, model, batch: int, gen: torch.Generator) -> tuple[tuple, dict]:
    """Call arguments of ``model`` (class ``name``) for ``batch`` samples, from its forward
    signature and config; random values from ``gen`` (the same draws on every rank)."""
    spec = INPUT_LAYOUT.get(name, {})
    params = inspect.signature(type(model).forward).parameters
    video = "3D" in name or spec.get("video", False)
    channels = spec["channels"](model) if "channels" in spec else _latent_channels(dict(model.config), model)
    frames, height, width = spec.get("size", (FRAMES, HEIGHT, WIDTH))
    shape = (batch, channels, frames, height, width) if video else (batch, channels, 8, 12)
    if spec.get("channels_last"):
        shape = (batch, frames, height, width, channels)
    if spec.get("frames_first"):
        shape = (batch, frames, channels, height, width)
    if spec.get("packed"):
        shape = (batch, math.prod(shape[2:]), channels)
    kwargs: dict = {}
    for pname, p in params.items():
        if pname == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or pname in spec.get("extra", {}):
            continue
        if pname == "hidden_states":
            kwargs[pname] = torch.randn(shape, generator=gen)
        elif pname in _TEXT_INPUTS and (pname == "encoder_hidden_states" or p.default is inspect.Parameter.empty):
            kwargs[pname] = torch.randn(batch, TEXT_LEN, WIDTH_TEXT, generator=gen)
        elif pname in _POOLED_INPUTS:
            kwargs[pname] = torch.randn(batch, WIDTH_TEXT, generator=gen)
        elif pname in ("timestep", "timesteps") or (pname.endswith("_timestep") and not isinstance(p.default, bool)):
            kwargs[pname] = torch.rand(batch, generator=gen) * 1000
        elif pname == "encoder_attention_mask":
            kwargs[pname] = torch.ones(batch, TEXT_LEN)
        elif pname == "guidance" and dict(model.config).get("guidance_embeds"):
            kwargs[pname] = torch.rand(batch, generator=gen) * 10
        elif pname == "return_dict":
            kwargs[pname] = False
        elif p.default is inspect.Parameter.empty:
            raise TypeError(f"{name}.forward needs {pname!r}: describe it in INPUT_LAYOUT")
    for pname, make in spec.get("extra", {}).items():
        kwargs[pname] = make(batch, kwargs, model, gen)
    return (), kwargs


# -- declared outcomes ---------------------------------------------------------------------
NOT_RUN = object()
"""A cell the suite does not run (save/load outside ``SAVE_LOAD``)."""

ALL = "*"
_GDN = ("sequence parallel: self-attention of the (linear, every 4th softmax) block 0 is a bidirectional "
        "gated-delta-net recurrence over the tokens (SanaWMBidirectionalGDNAttention, no SDPA): the split tokens "
        "are gathered before it: exact, but no all-to-all or ring runs")
_FLEX_RING = ("ring: self-attention is flex_attention (a higher-order op, not SDPA), which vdopt runs "
              "head-parallel under Ulysses only (ring attention would need its score_mod and block mask cut per "
              "K/V block): the tokens are gathered before it (exact, but no ring runs)")
EXPECTED_ROWS: dict[str, dict[str, str]] = {
    "AnyFlowFARTransformer3DModel": {
        "ring2": _FLEX_RING},
    "Kandinsky6SRTransformer3DModel": {
        "ring2": _FLEX_RING},
    "SanaWMTransformer3DModel": {
        "ulysses2": _GDN, "ring2": _GDN},
    "WanAnimateTransformer3DModel": {
        "pab": ("pab: vdopt broadcasts face_adapter.0 (a cross attention to the face motion tokens) like the "
                "blocks' cross attention; diffusers' hook (default identifiers 'blocks', 'transformer_blocks') "
                "computes it every step: 2.5e-3 apart from step 1")},
}
"""Per class, the cells expected to fail and why (``"*"``: every cell); absent cells pass."""


LINEAR_ATTENTION = ("SanaVideoTransformer3DModel", "SanaTransformer2DModel")
"""Classes whose self-attention is linear attention (no SDPA: ``K^T V`` sums over all tokens):
sequence parallel keeps the tokens split and all-reduces the partial sums, so their ulysses=2
and ring=2 cells run an all-reduce instead of an all-to-all or a ring."""


def expected(name: str, strategy: str):
    """None (passes), an xfail reason, or ``NOT_RUN``."""
    row = EXPECTED_ROWS.get(name, {})
    if ALL in row:
        return row[ALL]
    if strategy in row:
        return row[strategy]
    if strategy == "save_load" and name not in SAVE_LOAD:
        return NOT_RUN
    return None


def not_run_reason(name: str, strategy: str) -> str:
    return f"compile time budget: save/load (AOTInductor) runs for {', '.join(SAVE_LOAD)} only"


# -- the README table ----------------------------------------------------------------------
COLUMN_TITLES = {"single": "1 device", "ulysses2": "ulysses=2", "ring2": "ring=2", "cfg2": "cfg=2",
                 "pab": "PAB", "save_load": "save/load"}


def cells() -> list[dict]:
    """Every declared cell: class, group, strategy, status (pass / xfail / not run), reason."""
    out = []
    for group, name in matrix_classes():
        for strategy in STRATEGIES:
            reason = expected(name, strategy)
            if reason is NOT_RUN:
                status, reason = "not run", not_run_reason(name, strategy)
            else:
                status = "pass" if reason is None else "xfail"
            out.append(dict(model=name, group=group, strategy=strategy, status=status, reason=reason))
    return out


def support_table() -> str:
    """The README's support table (markdown), rendered from the declarations above."""
    import diffusers

    notes: dict[str, int] = {}

    def mark(cell: dict) -> str:
        if cell["status"] == "pass":
            return "yes"
        if cell["status"] == "not run":
            return "not run"
        n = notes.setdefault(cell["reason"], len(notes) + 1)
        return f"no [{n}]"

    by_model: dict[str, list[dict]] = {}
    for c in cells():
        by_model.setdefault(c["model"], []).append(c)
    lines = [
        f"Every transformer class a video pipeline of diffusers {diffusers.__version__} uses, and four "
        "image DiTs; generated from `tests/model_matrix.py`, checked by `tests/test_matrix.py` "
        "(exact strategies equal eager PyTorch to 1e-5 relative, float32, 2 real gloo ranks).",
        "",
        "| model | group | " + " | ".join(COLUMN_TITLES[s] for s in STRATEGIES) + " |",
        "|---|---|" + "---|" * len(STRATEGIES),
    ]
    for name, row in by_model.items():
        lines.append(f"| {name} | {row[0]['group']} | " + " | ".join(mark(c) for c in row) + " |")
    lines.append("")
    lines.extend(f"[{n}] {reason}" + "  " for reason, n in notes.items())
    lines.append(f"not run: {not_run_reason('', '')}.")
    return "\n".join(lines) + "\n"
