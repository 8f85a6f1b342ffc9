"""The drop_noops pass: export's asserts and identity casts/dropouts/copies go, real work stays."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from vdopt.models import build, list_models
from vdopt.passes.base import PassContext
from vdopt.passes.cleanup.drop_noops import DropNoOps, find_noops
from vdopt.passes.graph_utils import insert_call
from vdopt.passes.runner import run_passes
from vdopt.passes.cleanup.fold_views import FoldViews

import vdopt
from vdopt.capture import bind_call, capture
from vdopt.compile import original_graph
from vdopt.mesh import Mesh

aten = torch.ops.aten
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten.type_as.default}


def ctx() -> PassContext:
    return PassContext(mesh=Mesh(), device=torch.device("cpu"))


def calls(gm: torch.fx.GraphModule, *targets) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def same_dtype_casts(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in calls(gm, *_CASTS) if n.meta["val"].dtype == n.args[0].meta["val"].dtype]


def rel_err(out, ref) -> float:
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", list_models())
def test_zoo_graphs_lose_their_noops_and_keep_their_outputs(name):
    model, args, kwargs = build(name, "tiny")
    kwargs = bind_call(model, args, kwargs)
    before = capture(model, kwargs)
    assert calls(before, aten._assert_tensor_metadata.default) and same_dtype_casts(before)
    opt = vdopt.optimize(model)
    off = vdopt.optimize(model, disable_passes=("drop_noops",))
    with torch.no_grad():
        ref = model(**kwargs)
    out, out_off = opt(**kwargs), off(**kwargs)
    assert rel_err(out[0], ref[0]) <= 1e-6
    assert torch.equal(out[0], out_off[0])  # the pass is exact: bitwise the same as without it

    gm = original_graph(opt.plans[0].program.gm)
    assert calls(gm, aten._assert_tensor_metadata.default) == []
    assert same_dtype_casts(gm) == []
    assert calls(gm, aten.dropout.default) == []  # every zoo model's dropouts are p=0 or eval
    record = next(r for r in opt.plans[0].passes if r.name == "drop_noops")
    assert record.modified and record.stats["_assert_tensor_metadata"] > 0 and record.stats["to"] > 0
    gm_off = original_graph(off.plans[0].program.gm)
    assert sum(record.stats.values()) == len(gm_off.graph.nodes) - len(gm.graph.nodes)


def _identities_by_dtype(gm: torch.fx.GraphModule) -> Counter:
    """The reference count, from the values alone: every export assert, every dropout of an
    eval model, and each cast / ``type_as`` whose output has its input's dtype and device."""
    want = Counter()
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        kind = n.target._opname
        if kind in ("_assert_tensor_metadata", "dropout"):
            want[kind] += 1
        elif kind in ("to", "type_as"):
            x, out = n.args[0].meta["val"], n.meta["val"]
            want[kind] += (x.dtype, x.device) == (out.dtype, out.device)
    return +want


def test_wan_counts():
    """Wan has every kind the pass knows of a real DiT: asserts, casts, type_as, dropouts."""
    model, args, kwargs = build("wan", "tiny")
    gm = capture(model, bind_call(model, args, kwargs))
    gm, _ = run_passes(gm, ctx(), [FoldViews()])
    want = _identities_by_dtype(gm)
    assert set(want) == {"_assert_tensor_metadata", "dropout", "to", "type_as"}
    gm, records = run_passes(gm, ctx(), [DropNoOps()])
    assert records[0].stats == dict(want)
    assert find_noops(gm.graph) == []
    # a contiguous() that is kept (diffusers 0.42's Wan has one) copies a transposed tensor
    assert all(not n.args[0].meta["val"].is_contiguous() for n in calls(gm, aten.contiguous.default))


class Identities(torch.nn.Module):
    def forward(self, x, y):  # x: (4, 6) float32, y: (4, 6) float32
        a = (x * 2).to(torch.float32)
        b = torch.nn.functional.dropout(a, p=0.0, training=True)
        c = b.type_as(y)
        e = c.expand(4, 6)
        f = (e + 1).clone()  # a copy nothing can tell from its input
        g = f.sin()
        h = (x * 3).to(torch.float32)
        h.add_(1)  # mutates through the identity cast, i.e. x * 3 itself (a cast that aliases)
        return g, h


class RealWork(torch.nn.Module):
    def forward(self, x):  # x: (4, 6) float32
        up = x.to(torch.float64).mul(3).to(torch.float32)  # real dtype conversions
        dropped = torch.nn.functional.dropout(x, p=0.5, training=True)  # random: real work
        transposed = x.t().contiguous()  # a copy into the other layout
        last = x.view(1, 2, 2, 6).contiguous(memory_format=torch.channels_last)
        forced = (x * 2).to(torch.float32, copy=True)
        mutated = (x * 4).clone()
        mutated.add_(1)  # the clone's own storage is written: kept
        source = x * 5
        snapshot = source.clone()
        source.mul_(2)  # the clone's input is written after the clone: kept
        returned = (x * 6).clone()  # returned: the caller owns it, kept
        of_input = x.clone()  # a graph input: kept
        return up, dropped, transposed, last, forced, mutated, snapshot, source, returned, of_input


def test_identities_are_removed_and_results_unchanged():
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    gm = capture(Identities(), {"x": x, "y": y})
    # export already skips contiguous() of a contiguous tensor; add one by hand
    (expand,) = calls(gm, aten.expand.default)
    with gm.graph.inserting_after(expand):
        contiguous = insert_call(gm.graph, aten.contiguous.default, (expand,), created_by="test")
    expand.replace_all_uses_with(contiguous, delete_user_cb=lambda user: user is not contiguous)
    kinds = {n.target for n in find_noops(gm.graph)}
    assert {aten.dropout.default, aten.type_as.default, aten.contiguous.default, aten.expand.default,
            aten.clone.default, aten.to.dtype} <= kinds
    gm, records = run_passes(gm, ctx(), [DropNoOps()])
    stats = records[0].stats
    assert stats["to"] == 2 and stats["dropout"] == stats["type_as"] == stats["contiguous"] == 1
    assert stats["expand"] == stats["clone"] == 1
    left = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert left == {aten.mul.Tensor, aten.add.Tensor, aten.sin.default, aten.add_.Tensor}
    for got, want in zip(gm(x=x, y=y), Identities()(x, y), strict=True):
        assert torch.equal(got, want)


def test_real_conversions_dropouts_and_observable_copies_stay():
    x = torch.randn(4, 6)
    gm = capture(RealWork(), {"x": x})
    assert find_noops(gm.graph) == [n for n in gm.graph.nodes if n.target is aten._assert_tensor_metadata.default]
    gm, records = run_passes(gm, ctx(), [DropNoOps()])
    assert set(records[0].stats) <= {"_assert_tensor_metadata"}
    assert len(calls(gm, aten.to.dtype)) == 3 and len(calls(gm, aten.clone.default)) == 4
    assert len(calls(gm, aten.contiguous.default)) == 2
    (dropout,) = calls(gm, aten.dropout.default)
    assert dropout.args[1:] == (0.5, True)
    torch.manual_seed(0)
    got = gm(x=x)
    torch.manual_seed(0)
    want = RealWork()(x)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride()
    assert not (got[1] == x).all()  # the dropout did drop
