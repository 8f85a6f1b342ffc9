"""Capture of models torch.export cannot trace as they are: branches on tensor values,
sizes from tensor values (``nonzero``, masks, ``.item()``), tensors built inside ``forward``
(CogVideoX's positional table at a size other than ``sample_*``); the guards that recapture
when a data-dependent value changes; capture counts and times in the report."""

from __future__ import annotations

import logging

import pytest
import torch

import vdopt
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from vdopt.capture import bind_call, capture_guarded

RTOL = 1e-5


def assert_close(out, ref, rtol=RTOL):
    out_leaves = torch.utils._pytree.tree_leaves(out)
    ref_leaves = torch.utils._pytree.tree_leaves(ref)
    assert len(out_leaves) == len(ref_leaves)
    for a, b in zip(out_leaves, ref_leaves):
        assert a.shape == b.shape and a.dtype == b.dtype
        err = (a - b).abs().max() / b.abs().max().clamp_min(1e-30)
        assert err <= rtol, f"relative error {err:.2e} > {rtol}"


def eager(model, **kwargs):
    with torch.no_grad():
        return model(**kwargs)


# -- small models with data-dependent control flow and sizes -----------------------------------

class Gate(torch.nn.Module):
    """Branches in Python on a tensor's value."""

    def forward(self, x):
        if x.mean() > 0:
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)
        return x * 2


class Branching(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.gate = Gate()

    def forward(self, hidden_states):
        return self.gate(self.proj(hidden_states).unflatten(-1, (2, 4)).transpose(1, 2))


class MaskedAttention(torch.nn.Module):
    """Attends over the tokens a mask keeps: ``nonzero`` gives a data-dependent length."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.out = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, mask):
        keep = mask.nonzero()[:, 0]
        kept = hidden_states[:, keep]
        q, k, v = self.qkv(kept).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


class CountedSlice(torch.nn.Module):
    """Takes a length from ``.item()`` of a mask sum (a text mask turned into a length)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask):
        n = int(encoder_attention_mask.sum().item())
        text = encoder_hidden_states[:, :n]
        q = self.proj(hidden_states).unflatten(-1, (2, 4)).transpose(1, 2)
        kv = self.proj(text).unflatten(-1, (2, 4)).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, kv, kv).transpose(1, 2).flatten(2)


class NumpyOfInput(torch.nn.Module):
    """Reads a tensor's values through numpy: no capture can follow it."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)
        self.scale = ScaleFromNumpy()

    def forward(self, x):
        return self.scale(self.inner(x))


class ScaleFromNumpy(torch.nn.Module):
    def forward(self, x):
        return x * float(x.detach().numpy().max())


def test_branch_on_a_tensor_value_is_specialized_and_guarded(caplog):
    torch.manual_seed(0)
    model = Branching().eval()
    opt = vdopt.optimize(model)
    # the branch follows proj's output: shift the inputs until it goes either way
    with torch.no_grad():
        candidates = [torch.randn(2, 6, 8) + shift for shift in (-10, -3, 3, 10)]
        up = next(x for x in candidates if model.proj(x).mean() > 0)
        down = next(x for x in candidates if model.proj(x).mean() <= 0)
    assert_close(opt(hidden_states=up), eager(model, hidden_states=up))
    assert len(opt.plans) == 1 and opt.plans[0].guards is not None
    assert [s.kind for s in opt.plans[0].sites] == ["full"]  # the SDPA branch was taken
    with caplog.at_level(logging.INFO, logger="vdopt"):
        assert_close(opt(hidden_states=down), eager(model, hidden_states=down))  # guard fails: recapture
    assert "guards of 1 plan(s) fail" in caplog.text
    assert len(opt.plans) == 2 and opt.plans[1].sites == ()
    # both specializations are kept: flipping back reuses them, without a capture
    for x in (up, down, up + 1):
        assert_close(opt(hidden_states=x), eager(model, hidden_states=x))
    assert len(opt.plans) == 2
    report = opt.report()
    assert "captures: 2" in report and report.count("specialized on data-dependent values") == 2


def test_guarded_plans_are_refused_by_save(tmp_path):
    torch.manual_seed(0)
    opt = vdopt.optimize(Branching().eval())
    opt(hidden_states=torch.randn(2, 6, 8))
    with pytest.raises(vdopt.ArtifactError, match="data-dependent values.*carry no guards"):
        opt.save(tmp_path / "artifact")
    assert not (tmp_path / "artifact").exists()


def test_sizes_from_nonzero_are_specialized_by_capture_guarded():
    torch.manual_seed(1)
    model = MaskedAttention().eval()
    x = torch.randn(2, 7, 8)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1])
    captured = capture_guarded(model, bind_call(model, (x, mask), {}))
    assert captured.guards is not None and "Eq(u0, 5)" in captured.guards.describe()
    for n in captured.gm.graph.nodes:  # every size the passes see is known: no unbacked symbol left
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert not free_unbacked_symbols(val), n.format_node()
            assert [int(s) for s in val.shape]
    sites = vdopt.inspect(model, x, mask)
    assert [(s.q_len, s.kv_len) for s in sites] == [(5, 5)]
    # optimize keeps the count symbolic instead (tests/test_unbacked.py): one plan for both counts
    opt = vdopt.optimize(model)
    assert_close(opt(x, mask), eager(model, hidden_states=x, mask=mask))
    fewer = torch.tensor([0, 0, 1, 1, 0, 0, 1])
    assert_close(opt(x, fewer), eager(model, hidden_states=x, mask=fewer))
    assert len(opt.plans) == 1 and opt.plans[0].guards.symbols


def test_length_from_item_is_specialized():
    torch.manual_seed(2)
    model = CountedSlice().eval()
    kwargs = dict(
        hidden_states=torch.randn(2, 6, 8), encoder_hidden_states=torch.randn(2, 5, 8),
        encoder_attention_mask=torch.tensor([1, 1, 1, 0, 0]),
    )
    opt = vdopt.optimize(model)
    assert_close(opt(**kwargs), eager(model, **kwargs))
    assert [(s.kind, s.kv_len) for s in opt.plans[0].sites] == [("cross", 3)]
    longer = {**kwargs, "encoder_attention_mask": torch.tensor([1, 1, 1, 1, 0])}
    assert_close(opt(**longer), eager(model, **longer))
    assert len(opt.plans) == 2
    # a float mask: export keeps no run-time check of a float value, so vdopt refuses it
    floats = {**kwargs, "encoder_attention_mask": torch.tensor([1.0, 1, 1, 0, 0])}
    with pytest.raises(vdopt.CaptureError) as info:
        vdopt.optimize(model)(**floats)
    assert "in module CountedSlice (CountedSlice, forward)" in str(info.value)
    assert f"{__file__}:" in str(info.value) and "encoder_attention_mask.sum().item()" in str(info.value)
    assert "integer or bool dtype" in str(info.value)


def test_unspecializable_model_error_names_module_and_source_line():
    opt = vdopt.optimize(NumpyOfInput())
    with pytest.raises(vdopt.CaptureError) as info:
        opt(torch.randn(2, 4))
    message = str(info.value)
    assert "scale (ScaleFromNumpy, forward)" in message
    assert f"{__file__}:" in message and "x.detach().numpy()" in message
    assert "Compute them with torch operations" in message and "outside torch" in message


def test_second_call_with_the_same_shapes_does_not_capture_again():
    torch.manual_seed(3)
    model = MaskedAttention().eval()
    opt = vdopt.optimize(model)
    mask = torch.tensor([1, 1, 0, 1])
    for _ in range(3):
        x = torch.randn(1, 4, 8)
        assert_close(opt(x, mask), eager(model, hidden_states=x, mask=mask))
    assert len(opt.plans) == 1
    plan = opt.plans[0]
    assert plan.capture_s > 0 and plan.passes_s > 0
    report = opt.report()
    assert "captures: 1 (capture" in report and f"capture {plan.capture_s:.2f} s" in report


# -- diffusers models ------------------------------------------------------------------------

def cogvideox(seed: int = 0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    # sample_* as in diffusers' pipeline test fixture: 49 frames, 8x8 latents
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=7,
    ).eval()


def cogvideox_inputs(frames: int, height: int, width: int):
    latent_frames = (frames - 1) // 4 + 1
    return dict(
        hidden_states=torch.randn(1, latent_frames, 4, height, width),
        encoder_hidden_states=torch.randn(1, 7, 16), timestep=torch.tensor([500]), return_dict=False,
    )


def test_cogvideox_at_sizes_other_than_sample_rebuilds_its_positional_table():
    model = cogvideox()
    opt = vdopt.optimize(model)
    # frames 8 and 13 (diffusers' pipeline fixtures), and a latent grid other than sample_*
    for frames, height, width in [(8, 8, 8), (13, 8, 8), (9, 6, 10)]:
        kwargs = cogvideox_inputs(frames, height, width)
        ref = eager(model, **kwargs)
        assert_close(opt(**kwargs), ref)
        kwargs2 = {**kwargs, "hidden_states": torch.randn_like(kwargs["hidden_states"])}
        assert_close(opt(**kwargs2), eager(model, **kwargs2))
    assert len(opt.plans) == 3 and all(p.guards is None for p in opt.plans)
    layout = opt.plans[2].layout
    assert (layout.frames, layout.height, layout.width) == (3, 3, 5)


class NumpyRope(torch.nn.Module):
    """Builds its rotary table with numpy for the call's token count, and a mask through ``.data``."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, hidden_states):
        import numpy as np

        n = hidden_states.shape[1]
        angles = torch.from_numpy(np.outer(np.arange(n), 1.0 / 10000 ** (np.arange(4) / 4)).astype(np.float32))
        mask = hidden_states.new_zeros(n, n)
        mask.data[:, : n - 1] = 1.0  # no query attends to the last token but the last one
        mask.data.fill_diagonal_(1.0)
        x = self.proj(hidden_states).unflatten(-1, (2, 4)).transpose(1, 2)
        x = x * angles.cos() + x.roll(1, -1) * angles.sin()
        o = torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=mask.bool())
        return o.transpose(1, 2).flatten(2)


def test_tables_built_in_forward_are_right_at_every_size():
    torch.manual_seed(4)
    model = NumpyRope().eval()
    opt = vdopt.optimize(model)
    for n in (5, 9, 5):
        x = torch.randn(2, n, 8)
        assert_close(opt(hidden_states=x), eager(model, hidden_states=x))
    assert len(opt.plans) == 2 and all(p.guards is None for p in opt.plans)


def framepack(seed: int = 0):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), image_condition_type=None, has_image_proj=True,
        image_proj_dim=16, has_clean_x_embedder=True,
    ).eval()
    return model


def framepack_inputs(text_kept: int, history: int):
    """FramePack's inputs: the text mask keeps ``text_kept`` of 6 tokens; ``history`` clean frames."""
    mask = torch.zeros(1, 6, dtype=torch.int64)
    mask[:, :text_kept] = 1
    return dict(
        hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.tensor([700]),
        encoder_hidden_states=torch.randn(1, 6, 16), encoder_attention_mask=mask,
        pooled_projections=torch.randn(1, 8), image_embeds=torch.randn(1, 3, 16),
        indices_latents=torch.arange(history + 6, history + 8),
        latents_clean=torch.randn(1, 4, history, 8, 8), indices_latents_clean=torch.arange(history),
        latents_history_2x=torch.randn(1, 4, 2, 8, 8), indices_latents_history_2x=torch.arange(history, history + 2),
        latents_history_4x=torch.randn(1, 4, 4, 8, 8), indices_latents_history_4x=torch.arange(history + 2, history + 6),
        guidance=torch.tensor([3500.0]), return_dict=False,
    )


def test_framepack_text_mask_turned_into_a_length():
    model = framepack()
    opt = vdopt.optimize(model)
    for text_kept in (4, 2, 4):
        kwargs = framepack_inputs(text_kept, history=1)
        assert_close(opt(**kwargs), eager(model, **kwargs))
    # one plan per text length; the third call reuses the first
    assert len(opt.plans) == 2 and all(p.guards is not None for p in opt.plans)
    # FramePack's text length stays no symbol: torch's real-tensor check of a slice whose start
    # is a data-dependent size fails (torch 2.13), so the specialized capture is used, and said
    for p in opt.plans:
        assert p.guards.symbols == () and p.guards.why_specialized.startswith("the symbolic capture failed")
    assert "specialized on data-dependent values" in opt.report() and "the symbolic capture failed" in opt.report()
    lengths = [sorted({s.kv_len for s in p.sites}) for p in opt.plans]
    assert lengths[0] != lengths[1] and all(isinstance(n, int) for n in lengths[0])


# -- several ranks ---------------------------------------------------------------------------

class MaskedTextDiT(torch.nn.Module):
    """A tiny video DiT whose text tokens are the ones a mask keeps (``nonzero``) and which
    skips its cross attention when the mask keeps none (a branch on a tensor value)."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv3d(4, 16, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.qkv = torch.nn.Linear(16, 48)
        self.q = torch.nn.Linear(16, 16)
        self.kv = torch.nn.Linear(8, 32)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask):
        x = self.patch(hidden_states).flatten(2).transpose(1, 2)  # (B, T*H*W, C)
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        if encoder_attention_mask.any():
            text = encoder_hidden_states[:, encoder_attention_mask[0].nonzero()[:, 0]]
            k, v = self.kv(text).unflatten(-1, (2, 2, 8)).permute(2, 0, 3, 1, 4)
            q = self.q(x).unflatten(-1, (2, 8)).transpose(1, 2)
            x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.out(x)


def masked_text_inputs(mask: list[int]):
    return dict(
        hidden_states=torch.randn(1, 4, 2, 4, 6), encoder_hidden_states=torch.randn(1, len(mask), 8),
        encoder_attention_mask=torch.tensor([mask]),
    )


def _ulysses_on_data_dependent_model(rank: int, world: int) -> dict:
    torch.manual_seed(0)  # same weights on every rank
    model = MaskedTextDiT().eval()
    opt = vdopt.optimize(model, vdopt.Mesh(ulysses=2))
    errors = []
    for mask in ([1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 1, 1, 0]):
        kwargs = masked_text_inputs(mask)
        ref = eager(model, **kwargs)
        out = opt(**kwargs)
        errors.append(float((out - ref).abs().max() / ref.abs().max()))
    kinds = [sorted(s.kind for s in p.sites) for p in opt.plans]
    return {"errors": errors, "plans": len(opt.plans), "kinds": kinds,
            "report": opt.report() if rank == 0 else ""}


def test_ulysses_on_a_data_dependent_model_matches_eager():
    from multirank import run_on_ranks

    results = run_on_ranks(2, _ulysses_on_data_dependent_model, timeout=300)
    for result in results:
        assert max(result["errors"]) <= RTOL, result["errors"]
        # 3 text tokens kept, then none (no cross attention), then 3 others: the first plan again
        assert result["plans"] == 2
        assert result["kinds"] == [["cross", "full"], ["full"]]
    assert "ulysses: all_to_all" in results[0]["report"] and "captures: 2" in results[0]["report"]
