"""Tiny random diffusers text-to-video pipelines, built offline: Wan (2.1 and 2.2), CogVideoX,
HunyuanVideo and LTX-Video.

Components follow diffusers' own pipeline test fixtures (``get_dummy_components`` in
``tests/pipelines/<name>/test_<name>.py`` of huggingface/diffusers): the same tiny
transformer and VAE configurations. Those fixtures download tiny tokenizers and text encoders
from the Hub; here the text encoders are built from a config (tiny-random-t5's sizes for T5,
the fixture's ``LlamaConfig`` and ``CLIPTextConfig`` for HunyuanVideo) and the tokenizers are
word-level ``PreTrainedTokenizerFast`` objects built locally, so nothing is downloaded.
``save_tiny_pipeline`` writes one with ``save_pretrained``, loadable by
``DiffusionPipeline.from_pretrained`` like any downloaded pipeline.

``TINY_CALLS[name]`` are the call arguments the tiny pipeline is sized for (frames, height,
width, text length, guidance) and, for HunyuanVideo, what turns its true CFG on (a negative
prompt and ``true_cfg_scale``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

import torch

__all__ = ["PIPELINES", "TINY_CALLS", "build_tiny_pipeline", "save_tiny_pipeline", "tiny_tokenizer"]

PIPELINES = ("wan", "wan22", "cogvideox", "hunyuanvideo", "ltx")
"""Names ``build_tiny_pipeline`` takes: ``wan22`` is Wan 2.2's two-expert pipeline
(``transformer`` for high noise, ``transformer_2`` for low noise)."""

VOCAB_WORDS = (
    "a an the of in on at with and to is are dance monkey cat dog bird fish horse car tree sea sky "
    "city street forest river mountain snow rain sun moon night day red blue green white black "
    "walking running flying swimming jumping sitting video photo painting beautiful slow fast "
    "camera close up wide shot bad blurry low quality negative"
).split()
"""The tiny tokenizers' words; any other word is ``<unk>``."""

TEXT_VOCAB = 1000
"""Vocabulary size of the tiny text encoders (the fixtures'): larger than the tokenizers'."""

TINY_CALLS: Mapping[str, Mapping] = MappingProxyType({
    "wan": MappingProxyType(dict(num_frames=9, height=16, width=16, max_sequence_length=16, guidance_scale=6.0)),
    "wan22": MappingProxyType(dict(num_frames=9, height=16, width=16, max_sequence_length=16, guidance_scale=6.0)),
    "cogvideox": MappingProxyType(dict(num_frames=9, height=16, width=16, max_sequence_length=16, guidance_scale=6.0)),
    "hunyuanvideo": MappingProxyType(dict(
        num_frames=9, height=16, width=16, max_sequence_length=16, guidance_scale=4.5, true_cfg_scale=4.0,
        prompt_template={"template": "{}", "crop_start": 0},
    )),
    "ltx": MappingProxyType(dict(num_frames=9, height=32, width=32, max_sequence_length=16, guidance_scale=3.0)),
})


def tiny_tokenizer(*, bos: bool = False, model_max_length: int = 512):
    """A word-level fast tokenizer: ``<pad>`` 0, ``</s>`` 1 (appended, as T5's), ``<unk>`` 2,
    ``<s>`` 3 (prepended when ``bos``, as Llama's and CLIP's), then ``VOCAB_WORDS``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    vocab = {token: i for i, token in enumerate(specials + list(VOCAB_WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "<s> $A </s>" if bos else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=single + " $B </s>", special_tokens=[("</s>", 1), ("<s>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        bos_token="<s>" if bos else None, model_max_length=model_max_length,
    )


def _t5_encoder(umt5: bool = False):
    """hf-internal-testing/tiny-random-t5's sizes (the fixtures' text encoder), 2 layers; UMT5
    (Wan's text encoder class) has the same configuration keys."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(
        vocab_size=TEXT_VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    return model_class(config).eval()


def _wan(two_experts: bool):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    def transformer():
        torch.manual_seed(0)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        )

    first = transformer()
    second = None
    if two_experts:
        torch.manual_seed(1)  # its own weights: a swapped expert must change the result
        second = transformer()
        with torch.no_grad():
            for p in second.parameters():
                p.add_(0.02 * torch.randn_like(p))
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(0)
    return WanPipeline(
        tokenizer=tiny_tokenizer(), text_encoder=_t5_encoder(umt5=True), transformer=first, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer_2=second,
        boundary_ratio=0.875 if two_experts else None,
    )


def _cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    torch.manual_seed(0)
    return CogVideoXPipeline(tokenizer=tiny_tokenizer(), text_encoder=_t5_encoder(), vae=vae,
                             transformer=transformer, scheduler=DDIMScheduler())


def _hunyuanvideo():
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    )
    common = dict(bos_token_id=3, eos_token_id=1, pad_token_id=0, intermediate_size=37, layer_norm_eps=1e-5,
                  num_attention_heads=4, num_hidden_layers=2, vocab_size=TEXT_VOCAB, hidden_act="gelu")
    torch.manual_seed(0)
    text_encoder = LlamaModel(LlamaConfig(hidden_size=16, **common)).eval()
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(hidden_size=8, projection_dim=32, **common)).eval()
    return HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tiny_tokenizer(bos=True), transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_tokenizer(bos=True, model_max_length=77),
    )


def _ltx():
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=1, caption_channels=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), spatio_temporal_scaling=(True, True, False, False),
        layers_per_block=(1, 1, 1, 1, 1), patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
        # the decoder mirrors the encoder (diffusers' defaults upsample further: 2x the frames and size)
        decoder_block_out_channels=(8, 8, 8, 8), decoder_layers_per_block=(1, 1, 1, 1, 1),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    torch.manual_seed(0)
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_t5_encoder(),
                       tokenizer=tiny_tokenizer(), transformer=transformer)


def build_tiny_pipeline(name: str):
    """A tiny random pipeline (float32, CPU, eval mode, progress bar off); see the module doc."""
    builders = {"wan": lambda: _wan(False), "wan22": lambda: _wan(True), "cogvideox": _cogvideox,
                "hunyuanvideo": _hunyuanvideo, "ltx": _ltx}
    if name not in builders:
        raise ValueError(f"unknown tiny pipeline {name!r}: choose one of {', '.join(PIPELINES)}")
    pipe = builders[name]()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(name: str, directory: str | os.PathLike) -> str:
    """Write the tiny pipeline ``name`` with ``save_pretrained``; returns the directory."""
    pipe = build_tiny_pipeline(name)
    pipe.save_pretrained(str(directory))
    return str(directory)
