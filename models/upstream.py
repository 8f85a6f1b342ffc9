"""Load released upstream checkpoints into the zoo's own models.

``load_upstream(name, state_dict_or_path, config)`` reads a checkpoint as its authors
released it (key names of their modules, their ``config.json``) and returns our model with
those weights:

- ``"opensora"``: Open-Sora 1.2 STDiT3 (hpcaitech/Open-Sora ``opensora/models/stdit/
  stdit3.py`` and ``opensora/models/layers/blocks.py`` at v1.2.0; the Hugging Face
  checkpoint ``hpcai-tech/OpenSora-STDiT-v3`` with its transformers ``STDiT3Config``).
- ``"opensora_plan"``: Open-Sora-Plan v1.3 (PKU-YuanGroup/Open-Sora-Plan ``opensora/
  models/diffusion/opensora_v1_3/modeling_opensora.py`` and ``modules.py``; the diffusers
  ``config.json`` of the released ``OpenSoraT2V_v1_3`` checkpoints).

Key names are mapped by a short table of rename rules per model; a key no rule renames
must already have our name. Anything that does not line up (a key missing, a key left
over, a shape that differs) is a ``ValueError`` that lists every offender, with block
indices folded (``transformer_blocks.{0-31}.attn1.to_q.weight``).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .opensora import STDiT3, STDiT3Config
from .opensora_plan import OpenSoraPlanConfig, OpenSoraPlanT2V

__all__ = ["load_upstream", "config_from_upstream", "UPSTREAM_MODELS"]

PathLike = str | Path


# ----------------------------------------------------------------------------- rename rules

# Placeholders of the rule templates and what they match.
_FIELDS = {"i": r"\d+", "a": r"[12]", "x": r"[qkv]", "w": r"weight|bias"}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w\})", template)
    pattern = "".join(
        f"(?P<{p[1]}>{_FIELDS[p[1]]})" if re.fullmatch(r"\{\w\}", p) else re.escape(p)
        for p in parts
    )
    return re.compile(pattern + r"\Z")


@dataclass(frozen=True)
class _Rule:
    """Upstream key template <-> our key template, ``{i}`` etc. as in ``_FIELDS``."""

    upstream: str
    ours: str
    to_ours: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Reshapes the upstream tensor into ours (a view), where the modules differ."""

    def rename(self, key: str, forward: bool = True) -> str | None:
        src, dst = (self.upstream, self.ours) if forward else (self.ours, self.upstream)
        m = _template_regex(src).match(key)
        return dst.format(**m.groupdict()) if m else None


def _conv2d_as_conv3d(w: torch.Tensor) -> torch.Tensor:
    # Upstream's PatchEmbed2D is a Conv2d applied per frame; ours a Conv3d with kernel
    # (1, p, p), which computes the same thing with a unit temporal kernel.
    return w.unsqueeze(2) if w.dim() == 4 else w


_PLAN_RULES = (
    # diffusers PixArtAlphaTextProjection: linear_1, GELU(tanh), linear_2
    _Rule("caption_projection.linear_1.{w}", "caption_projection.fc1.{w}"),
    _Rule("caption_projection.linear_2.{w}", "caption_projection.fc2.{w}"),
    # opensora/models/diffusion/common.py PatchEmbed2D.proj (Conv2d)
    _Rule("pos_embed.proj.{w}", "patch_embed.{w}", _conv2d_as_conv3d),
    # diffusers AdaLayerNormSingle: emb.timestep_embedder (TimestepEmbedding), linear (after SiLU)
    _Rule("adaln_single.emb.timestep_embedder.linear_1.{w}", "t_embedder.mlp.0.{w}"),
    _Rule("adaln_single.emb.timestep_embedder.linear_2.{w}", "t_embedder.mlp.2.{w}"),
    _Rule("adaln_single.linear.{w}", "t_block.1.{w}"),
    # diffusers Attention: to_out is ModuleList([Linear, Dropout])
    _Rule("transformer_blocks.{i}.attn{a}.to_out.0.{w}", "transformer_blocks.{i}.attn{a}.to_out.{w}"),
    # diffusers FeedForward("gelu-approximate"): net = [GELU(proj), Dropout, Linear]
    _Rule("transformer_blocks.{i}.ff.net.0.proj.{w}", "transformer_blocks.{i}.ff.proj_in.{w}"),
    _Rule("transformer_blocks.{i}.ff.net.2.{w}", "transformer_blocks.{i}.ff.proj_out.{w}"),
    # Same names: transformer_blocks.{i}.attn{a}.to_{x}.{w}, transformer_blocks.{i}.
    # scale_shift_table, scale_shift_table, proj_out.{w}.
)

_STDIT3_RULES = (
    # PatchEmbed3D.proj (Conv3d)
    _Rule("x_embedder.proj.{w}", "x_embedder.{w}"),
    # CaptionEmbedder: y_proj is timm's Mlp (fc1, act, fc2); y_embedding the null caption
    _Rule("y_embedder.y_proj.fc1.{w}", "y_embedder.fc1.{w}"),
    _Rule("y_embedder.y_proj.fc2.{w}", "y_embedder.fc2.{w}"),
    _Rule("y_embedder.y_embedding", "y_embedding"),
    # Same names: t_embedder.mlp.{0,2}, fps_embedder.mlp.{0,2}, t_block.1,
    # {spatial,temporal}_blocks.{i}.{attn.qkv, attn.q_norm, attn.k_norm, attn.proj,
    # cross_attn.q_linear, cross_attn.kv_linear, cross_attn.proj, mlp.fc1, mlp.fc2,
    # scale_shift_table}, final_layer.{linear, scale_shift_table}.
)


def _check_stdit3_rope_freqs(config: STDiT3Config, freqs: torch.Tensor) -> None:
    # rotary_embedding_torch.RotaryEmbedding(dim=head_dim) keeps its (fixed) inverse
    # frequencies as a parameter ``rope.freqs``; ours are computed, so only check them.
    dim = config.head_dim
    ours = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    if freqs.shape != ours.shape or not torch.allclose(freqs.float().cpu(), ours, rtol=1e-3):
        raise ValueError(
            f"rope.freqs {tuple(freqs.shape)} is not the RoPE of head dim {dim} with theta "
            f"{config.rope_theta} that STDiT3 computes"
        )


# ----------------------------------------------------------------------------- configs

# Keys of the upstream configs that only matter for training, parallelism or bookkeeping.
_STDIT3_IGNORED = {
    "input_size", "class_dropout_prob", "drop_path", "enable_flash_attn",
    "enable_layernorm_kernel", "enable_sequence_parallelism", "only_train_temporal",
    "freeze_y_embedder", "architectures", "model_type", "torch_dtype", "transformers_version",
}
_PLAN_IGNORED = {"dropout", "sample_size_h", "sample_size_w", "sample_size_t", "upcast_attention"}

# OpenSoraT2V_v1_3.__init__ defaults, used where a config omits a key (as from_config does).
_PLAN_DEFAULTS: Mapping[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 88, "in_channels": None,
    "out_channels": None, "num_layers": 1, "cross_attention_dim": None, "attention_bias": True,
    "patch_size": None, "patch_size_t": None, "activation_fn": "geglu",
    "only_cross_attention": False, "double_self_attention": False,
    "norm_elementwise_affine": False, "norm_eps": 1e-6, "caption_channels": None,
    "interpolation_scale_h": 1.0, "interpolation_scale_w": 1.0, "interpolation_scale_t": 1.0,
    "sparse1d": False, "sparse_n": 2,
}


def _unknown_keys(name: str, config: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
        warnings.warn(f"{name}: ignoring unknown config keys {unknown}", stacklevel=3)


def _stdit3_config(config: Mapping[str, Any]) -> STDiT3Config:
    """transformers ``STDiT3Config`` (stdit3.py) -> ours; absent keys take upstream's
    defaults, which are ours."""
    if config.get("skip_y_embedder"):
        raise ValueError("opensora: skip_y_embedder=True is not supported (our forward embeds captions)")
    fields = {
        "depth", "hidden_size", "num_heads", "mlp_ratio", "in_channels", "pred_sigma",
        "caption_channels", "model_max_length", "qk_norm", "input_sq_size",
    }
    _unknown_keys("opensora", config, fields | _STDIT3_IGNORED | {"patch_size", "skip_y_embedder"})
    kwargs = {k: config[k] for k in fields if k in config}
    if "patch_size" in config:
        kwargs["patch_size"] = tuple(config["patch_size"])
    return STDiT3Config(**kwargs)


def _plan_config(config: Mapping[str, Any]) -> OpenSoraPlanConfig:
    """diffusers config of ``OpenSoraT2V_v1_3`` (modeling_opensora.py) -> ours."""
    _unknown_keys("opensora_plan", config, set(_PLAN_DEFAULTS) | _PLAN_IGNORED)
    c = {**_PLAN_DEFAULTS, **config}
    required = [k for k in ("in_channels", "patch_size", "patch_size_t", "caption_channels") if c[k] is None]
    if required:
        raise ValueError(f"opensora_plan: the config must set {required}")
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    # What our module implements; anything else would load but compute something else.
    supported = {
        "activation_fn": c["activation_fn"] == "gelu-approximate",
        "attention_bias": c["attention_bias"] is True,
        "only_cross_attention": not c["only_cross_attention"],
        "double_self_attention": not c["double_self_attention"],
        "norm_elementwise_affine": not c["norm_elementwise_affine"],
        "cross_attention_dim": c["cross_attention_dim"] in (None, hidden),
        # PatchEmbed2D patchifies frame by frame whatever patch_size_t says, while
        # proj_out uses it: only 1 is consistent (and released).
        "patch_size_t": c["patch_size_t"] == 1,
    }
    bad = {k: c[k] for k, ok in supported.items() if not ok}
    if bad:
        raise ValueError(
            f"opensora_plan: unsupported config values {bad}; supported: activation_fn="
            f"'gelu-approximate', attention_bias=True, only_cross_attention=False, "
            f"double_self_attention=False, norm_elementwise_affine=False, "
            f"cross_attention_dim=None or {hidden}, patch_size_t=1"
        )
    return OpenSoraPlanConfig(
        num_layers=c["num_layers"],
        num_attention_heads=c["num_attention_heads"],
        attention_head_dim=c["attention_head_dim"],
        in_channels=c["in_channels"],
        out_channels=c["in_channels"] if c["out_channels"] is None else c["out_channels"],
        patch_size=c["patch_size"],
        patch_size_t=c["patch_size_t"],
        caption_channels=c["caption_channels"],
        norm_eps=c["norm_eps"],
        interpolation_scale_thw=(
            float(c["interpolation_scale_t"]),
            float(c["interpolation_scale_h"]),
            float(c["interpolation_scale_w"]),
        ),
        sparse1d=bool(c["sparse1d"]),
        sparse_n=c["sparse_n"],
    )


@dataclass(frozen=True, kw_only=True)
class _Upstream:
    """How one zoo model maps onto a released checkpoint."""

    model: Callable[[Any], nn.Module]
    """Our model class, built from our config."""
    config: Callable[[Mapping[str, Any]], Any]
    """Upstream config dict -> our config."""
    rules: tuple[_Rule, ...]
    """Renames; keys no rule matches keep their name."""
    checked: Mapping[str, Callable[[Any, torch.Tensor], None]]
    """Upstream keys with no counterpart in our model (fixed tables we compute): validated
    against our config, then dropped."""


UPSTREAM_MODELS: Mapping[str, _Upstream] = {
    "opensora": _Upstream(
        model=STDiT3, config=_stdit3_config, rules=_STDIT3_RULES,
        checked={"rope.freqs": _check_stdit3_rope_freqs},
    ),
    "opensora_plan": _Upstream(
        model=OpenSoraPlanT2V, config=_plan_config, rules=_PLAN_RULES, checked={},
    ),
}
"""Zoo name -> its upstream mapping."""


def _spec(name: str) -> _Upstream:
    try:
        return UPSTREAM_MODELS[name]
    except KeyError:
        raise ValueError(
            f"no upstream checkpoint mapping for {name!r}; known: {', '.join(sorted(UPSTREAM_MODELS))}"
        ) from None


def config_from_upstream(name: str, config: Mapping[str, Any] | PathLike):
    """Our config for zoo model ``name`` from the upstream config (dict, ``config.json`` or
    the folder holding it)."""
    return _spec(name).config(_read_config(config))


# ----------------------------------------------------------------------------- files


def _read_config(config: Mapping[str, Any] | PathLike) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        return config
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"no config file at {path}")
    return json.loads(path.read_text())


_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors",
    "diffusion_pytorch_model.bin", "pytorch_model.bin",
)


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"reading {path} needs the safetensors package") from e
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_state_dict(source: Mapping[str, torch.Tensor] | PathLike) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        state = source
    else:
        path = Path(source)
        if path.is_dir():
            found = [path / f for f in _WEIGHT_FILES if (path / f).is_file()]
            shards = sorted(path.glob("*.index.json"))
            if found:
                path = found[0]
            elif shards:  # a sharded checkpoint: the index names the file of each key
                files = sorted(set(json.loads(shards[0].read_text())["weight_map"].values()))
                state = {}
                for f in files:
                    state.update(_load_file(path / f))
                return state
            else:
                raise ValueError(f"no weights in {path}; looked for {', '.join(_WEIGHT_FILES)}")
        if not path.is_file():
            raise ValueError(f"no checkpoint file at {path}")
        state = _load_file(path)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"not a flat state dict of tensors: {_fold(bad)}")
    return state


# ----------------------------------------------------------------------------- loading


def _fold(keys) -> str:
    """``a.0.b, a.1.b, a.3.b`` -> ``a.{0-1,3}.b``: one line per key pattern."""
    groups: dict[tuple[str, str], list[int]] = {}
    singles = []
    for key in sorted(keys):
        m = re.match(r"(.*?\.)(\d+)(\..*)", key)
        if m:
            groups.setdefault((m.group(1), m.group(3)), []).append(int(m.group(2)))
        else:
            singles.append(key)
    lines = list(singles)
    for (head, tail), indices in groups.items():
        if len(indices) == 1:
            lines.append(f"{head}{indices[0]}{tail}")
            continue
        indices.sort()
        runs, start = [], indices[0]
        for prev, cur in zip(indices, indices[1:] + [math.inf]):
            if cur != prev + 1:
                runs.append(f"{start}" if start == prev else f"{start}-{prev}")
                start = cur
        lines.append(f"{head}{{{','.join(runs)}}}{tail}")
    return "\n    " + "\n    ".join(sorted(lines))


def _to_ours(rules: tuple[_Rule, ...], key: str) -> tuple[str | None, _Rule | None]:
    """Our name of upstream ``key``; ``None`` for one of *our* names of a renamed key,
    which no upstream checkpoint has (a mixed-up checkpoint must not half load)."""
    for rule in rules:
        ours = rule.rename(key)
        if ours is not None:
            return ours, rule
    if any(rule.rename(key, forward=False) is not None for rule in rules):
        return None, None
    return key, None


def _to_upstream(rules: tuple[_Rule, ...], key: str) -> str:
    for rule in rules:
        upstream = rule.rename(key, forward=False)
        if upstream is not None:
            return upstream
    return key


def load_upstream(
    name: str,
    state_dict_or_path: Mapping[str, torch.Tensor] | PathLike,
    config: Mapping[str, Any] | PathLike,
) -> nn.Module:
    """Our zoo model ``name`` (``"opensora"`` or ``"opensora_plan"``) with upstream weights.

    ``state_dict_or_path``: a state dict with upstream key names, or a ``.safetensors``
    (needs ``safetensors``), ``.bin``/``.pt``/``.pth`` file, or a checkpoint folder.
    ``config``: the upstream config (``config.json`` contents), or its path or folder.
    The model is built without allocating and takes the given tensors as its parameters
    (their dtype and device; a dict's tensors are shared, not copied). Returned in eval
    mode. Raises ``ValueError`` listing every missing, unexpected or mis-shaped key.
    """
    spec = _spec(name)
    our_config = spec.config(_read_config(config))
    state = _read_state_dict(state_dict_or_path)
    with torch.device("meta"):
        model = spec.model(our_config)
    expected = model.state_dict()

    mapped: dict[str, torch.Tensor] = {}
    unexpected, shapes = [], []
    for key, tensor in state.items():
        if key in spec.checked:
            spec.checked[key](our_config, tensor)
            continue
        ours, rule = _to_ours(spec.rules, key)
        if ours not in expected:
            unexpected.append(key)
            continue
        if rule is not None and rule.to_ours is not None:
            tensor = rule.to_ours(tensor)
        if tensor.shape != expected[ours].shape:
            shapes.append(
                f"{key}: {tuple(tensor.shape)} in the checkpoint, {tuple(expected[ours].shape)} in the model"
            )
            continue
        mapped[ours] = tensor
    missing = [_to_upstream(spec.rules, k) for k in expected if k not in mapped]
    missing = [k for k in missing if k not in state]  # mis-shaped keys are reported once
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing keys (upstream names):{_fold(missing)}")
        if unexpected:
            problems.append(f"unexpected keys:{_fold(unexpected)}")
        if shapes:
            problems.append("shape mismatches:\n    " + "\n    ".join(shapes))
        raise ValueError(
            f"{name}: the checkpoint does not match {type(model).__name__}({our_config}):\n  "
            + "\n  ".join(problems)
        )
    model.load_state_dict(mapped, strict=True, assign=True)
    return model.eval()
