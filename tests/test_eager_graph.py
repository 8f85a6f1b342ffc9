"""The uncompiled executable's per-call path: ``EagerGraph`` and ``CallBinder`` change no value.

References: the model's own eager forward and the captured ``GraphModule`` on the same fresh
inputs (bitwise: the same ATen ops run in the same order). Speed is measured by ``vdopt
bench``, never asserted here.
"""

from __future__ import annotations

import inspect
import operator

import pytest
import torch

import vdopt
from vdopt.capture import bind_call, capture
from vdopt.compile import GUARDS_FN, EagerGraph, compile_graph, original_graph
from vdopt.models import build
from vdopt.runtime.executable import CallBinder


def fresh(name: str):
    model, args, kwargs = build(name, "tiny", seed=1)
    kwargs = {k: torch.randn_like(v) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "timestep" else v
              for k, v in kwargs.items()}
    return model, args, kwargs


@pytest.mark.parametrize("name", ["wan", "opensora"])
def test_eager_graph_matches_the_graph_module_and_the_model_bitwise(name):
    model, args, kwargs = fresh(name)
    inputs = bind_call(model, args, kwargs)
    gm = capture(model, inputs)
    runner = compile_graph(gm, "cpu", enabled=False)
    assert isinstance(runner, EagerGraph) and original_graph(runner) is gm
    with torch.no_grad():
        ref = model(*args, **kwargs)[0]
        torch.testing.assert_close(gm(**inputs)[0], ref, rtol=0, atol=0)
        out = runner(**inputs)
    assert isinstance(out, tuple) and len(out) == 1
    torch.testing.assert_close(out[0], ref, rtol=0, atol=0)
    # what a call no longer does: no parameter lookups, no OpOverload.__call__, no guard module
    flat = runner._forward.__self__.graph
    assert not flat.find_nodes(op="get_attr") and not flat.find_nodes(op="call_module")
    calls = [n for n in flat.nodes if n.op == "call_function"]
    assert not any(isinstance(n.target, torch._ops.OpOverload) for n in calls)
    ops = sum(1 for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload))
    assert sum(1 for n in calls if n.target is operator.call) == ops
    assert len(gm.graph.find_nodes(op="call_module", target=GUARDS_FN)) == 1  # export's check, left out


def test_eager_graph_runs_flat_graphs_and_submodule_calls():
    """A flat graph (PAB variants, PipeFusion stage graphs) is called with its leaves; a
    ``call_module`` is run through the module bound once."""
    inner = torch.nn.Linear(4, 3)
    root = torch.nn.Module()
    root.inner = inner
    root.register_buffer("scale", torch.randn(3))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module("inner", (x,))
    s = graph.get_attr("scale")
    graph.output((graph.call_function(torch.ops.aten.mul.Tensor, (y, s)), y))
    gm = torch.fx.GraphModule(root, graph)
    runner = EagerGraph(gm)
    x = torch.randn(2, 4)
    with torch.no_grad():
        ref = gm(x)
        out = runner(x)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_call_binder_binds_like_bind_call():
    model, args, kwargs = fresh("wan")
    binder = CallBinder(model)
    keyword = {**kwargs, "hidden_states": args[0]}
    # keyword calls in any order bind to the signature's order, as bind_call does
    shuffled = dict(reversed(list(keyword.items())))
    assert list(binder((), shuffled)) == list(bind_call(model, (), shuffled))
    assert binder((), shuffled).keys() == bind_call(model, (), shuffled).keys()
    assert all(binder((), shuffled)[k] is v for k, v in bind_call(model, (), shuffled).items())
    # positional calls and calls missing a required argument go through bind_call
    assert list(binder(args, kwargs)) == list(bind_call(model, args, kwargs))
    with pytest.raises(TypeError, match="hidden_states"):
        binder((), kwargs)


def test_optimized_model_output_and_binding_stay_exact_with_a_replaced_forward():
    model, args, kwargs = fresh("latte")
    opt = vdopt.optimize(model)
    with torch.no_grad():
        ref = model(*args, **kwargs)[0]
        torch.testing.assert_close(opt(*args, **kwargs)[0], ref, rtol=0, atol=0)
        torch.testing.assert_close(opt(hidden_states=args[0], **kwargs)[0], ref, rtol=0, atol=0)
    assert len(opt.plans) == 1  # positional and keyword calls share the plan
    # a forward replaced on the instance (as hooks do) is read again: its signature binds
    original = model.forward

    def forward(hidden_states, timestep=None, encoder_hidden_states=None, return_dict=True):
        return original(hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                        return_dict=return_dict)

    model.forward = forward
    try:
        binder = CallBinder(model)
        bound = binder((), {"hidden_states": args[0], **kwargs})
        assert list(bound) == [p for p in inspect.signature(forward).parameters if p in bound]
    finally:
        del model.forward
