"""optimize() on one device: same outputs and output structure as the model, on every zoo
model and on diffusers models vdopt has no rule for."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

import vdopt
from vdopt.capture import bind_call
from vdopt.models import build, list_models

import unseen_models


def assert_same_structure_and_close(out, ref, rtol):
    assert type(out) is type(ref)
    out_leaves = torch.utils._pytree.tree_leaves(out)
    ref_leaves = torch.utils._pytree.tree_leaves(ref)
    assert len(out_leaves) == len(ref_leaves)
    for a, b in zip(out_leaves, ref_leaves):
        assert a.shape == b.shape and a.dtype == b.dtype
        err = (a - b).abs().max() / b.abs().max().clamp_min(1e-30)
        assert err <= rtol, f"relative error {err:.2e} > {rtol}"


def fresh(kwargs: dict) -> dict:
    """The same inputs with new random values (tensors of floating dtype only)."""
    return {
        k: torch.randn_like(v) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "encoder_attention_mask" else v
        for k, v in kwargs.items()
    }


def build_kw(name: str, **shape):
    """A zoo model with all its inputs as keyword arguments."""
    model, args, kwargs = build(name, "tiny", **shape)
    return model, (), bind_call(model, args, kwargs)


@pytest.mark.parametrize("name", list_models())
def test_zoo_model_matches_eager(name):
    model, args, kwargs = build_kw(name)
    kwargs = fresh(kwargs)
    with torch.no_grad():
        ref = model(*args, **kwargs)
    opt = vdopt.optimize(model)
    assert_same_structure_and_close(opt(*args, **kwargs), ref, 1e-6)
    # a second call with new values reuses the plan and is still right
    kwargs2 = fresh(kwargs)
    with torch.no_grad():
        ref2 = model(*args, **kwargs2)
    assert_same_structure_and_close(opt(*args, **kwargs2), ref2, 1e-6)
    assert len(opt.plans) == 1


@pytest.mark.parametrize("factory", [unseen_models.hunyuan_video, unseen_models.pixart])
def test_unseen_diffusers_models_match_eager(factory):
    model, args, kwargs = factory()
    kwargs = fresh(kwargs)
    with torch.no_grad():
        ref = model(*args, **kwargs)
    out = vdopt.optimize(model)(*args, **kwargs)
    assert_same_structure_and_close(out, ref, 1e-6)


def test_return_dict_output_structure_is_kept():
    model, args, kwargs = build_kw("latte")
    kwargs = {**fresh(kwargs), "return_dict": True}
    with torch.no_grad():
        ref = model(*args, **kwargs)
    out = vdopt.optimize(model)(*args, **kwargs)
    assert isinstance(out, Transformer2DModelOutput)
    assert_same_structure_and_close(out, ref, 1e-6)


def test_positional_and_keyword_calls_share_a_plan():
    model, args, kwargs = build_kw("wan")
    opt = vdopt.optimize(model)
    ref = opt(**kwargs)
    positional = opt(kwargs["hidden_states"], kwargs["timestep"], kwargs["encoder_hidden_states"], return_dict=False)
    assert len(opt.plans) == 1
    torch.testing.assert_close(positional, ref, rtol=0, atol=0)


def test_new_input_shape_recaptures_with_the_right_answer():
    model, args, kwargs = build_kw("latte")
    opt = vdopt.optimize(model)
    opt(*args, **kwargs)
    _, args2, kwargs2 = build_kw("latte", batch=2, height=48, width=32)  # Latte fixes the frame count
    assert kwargs2["hidden_states"].shape != kwargs["hidden_states"].shape
    with torch.no_grad():
        ref = model(*args2, **kwargs2)
    out = opt(*args2, **kwargs2)
    assert len(opt.plans) == 2
    assert_same_structure_and_close(out, ref, 1e-6)
    # a dtype change is a new signature too
    attend = ParameterFree()
    opt = vdopt.optimize(attend)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 3, 5, 4, dtype=dtype)
        torch.testing.assert_close(opt(x), attend(x), rtol=1e-6, atol=1e-6)
    assert len(opt.plans) == 2


class ParameterFree(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.scaled_dot_product_attention(x, x, x)


def test_example_inputs_capture_ahead_of_the_first_call():
    model, args, kwargs = build("opensora", "tiny")
    opt = vdopt.optimize(model, example_inputs=(args, kwargs))
    assert len(opt.plans) == 1
    with torch.no_grad():
        ref = model(*args, **kwargs)
    assert_same_structure_and_close(opt(*args, **kwargs), ref, 1e-6)
    assert len(opt.plans) == 1


def test_model_is_not_mutated():
    model, args, kwargs = build("cogvideox", "tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = set(vars(model))
    modules = {name: (type(m), set(vars(m))) for name, m in model.named_modules()}
    forward = model.forward
    opt = vdopt.optimize(model)
    opt(*args, **kwargs)
    opt.reset()
    assert set(vars(model)) == attrs
    assert {name: (type(m), set(vars(m))) for name, m in model.named_modules()} == modules
    assert model.forward == forward
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_two_optimized_models_live_side_by_side():
    m1, a1, k1 = build("latte", "tiny", seed=1)
    m2, a2, k2 = build("wan", "tiny", seed=2)
    o1, o2 = vdopt.optimize(m1), vdopt.optimize(m2)
    r1, r2 = o1(*a1, **k1), o2(*a2, **k2)
    with torch.no_grad():
        assert_same_structure_and_close(r1, m1(*a1, **k1), 1e-6)
        assert_same_structure_and_close(r2, m2(*a2, **k2), 1e-6)


def test_pipeline_facing_attributes_are_forwarded():
    model, args, kwargs = build("wan", "tiny")
    opt = vdopt.optimize(model)
    assert opt.config is model.config
    assert opt.dtype == model.dtype
    with opt.cache_context("cond"):
        opt(*args, **kwargs)


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.detach().numpy().sum() > 0:  # values read through numpy: no trace can follow them
            return x * 2
        return x


class Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.gate = DataDependent()

    def forward(self, hidden_states):
        return self.gate(self.proj(hidden_states))


def test_unexportable_model_error_names_the_module():
    opt = vdopt.optimize(Wrapper())
    with pytest.raises(vdopt.CaptureError, match=r"gate \(DataDependent, forward\).*\n.*outside torch"):
        opt(torch.randn(2, 4))


def test_bad_arguments_are_clear_errors():
    model, args, kwargs = build("latte", "tiny")
    with pytest.raises(ValueError, match="kernels"):
        vdopt.optimize(model, kernels="cuda")
    with pytest.raises(TypeError, match="nn.Module"):
        vdopt.optimize(lambda x: x)
    with pytest.raises(ValueError, match="cfg=1, pipefusion=1, ring=1, ulysses=2, dsp=1"):
        vdopt.Mesh(ulysses=2)  # no process group and no torchrun environment: world size 1
    opt = vdopt.optimize(model)
    with pytest.raises(TypeError, match="forward"):
        opt(*args, not_an_argument=1, **kwargs)
