"""The pass runner and the fold_views pass on small hand-built graphs."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

import vdopt
from vdopt import meta
from vdopt.capture import capture
from vdopt.mesh import Mesh
from vdopt.passes.base import PassContext, PassResult
from vdopt.passes.runner import PassError, run_passes
from vdopt.passes.cleanup.fold_views import FoldViews, find_identity_views, find_view_chains


class LayoutChains(torch.nn.Module):
    def forward(self, x):  # x: (2, 3, 4)
        a = x.view(6, 4).view(2, 12)  # a chain: one fold
        b = x.permute(0, 2, 1).permute(2, 0, 1)  # a chain: one fold
        c = x.reshape(2, 3, 4)  # identity
        d = x.permute(0, 1, 2)  # identity
        return a.sum() + b.amax(dim=0).sum() + c * d


def ctx() -> PassContext:
    return PassContext(mesh=Mesh(), device=torch.device("cpu"))


def test_fold_views_counts_and_exactness():
    x = torch.randn(2, 3, 4)
    gm = capture(LayoutChains(), {"x": x})
    assert len(find_view_chains(gm.graph)) == 2
    assert len(find_identity_views(gm.graph)) == 2
    gm, records = run_passes(gm, ctx(), [FoldViews()])
    assert records[0].stats == {"folded_chains": 2, "removed_identities": 2}
    assert records[0].modified
    assert find_view_chains(gm.graph) == [] and find_identity_views(gm.graph) == []
    created = [n for n in gm.graph.nodes if n.meta.get(meta.CREATED_BY) == "fold_views"]
    assert len(created) == 2 and all("val" in n.meta for n in created)
    assert torch.equal(gm(x=x), LayoutChains()(x))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Explodes:
    name: ClassVar[str] = "explodes"
    tier: ClassVar[str] = "exact"

    def __call__(self, gm, ctx):
        raise RuntimeError("boom")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeavesNodeWithoutValue:
    name: ClassVar[str] = "careless"
    tier: ClassVar[str] = "exact"

    def __call__(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(torch.ops.aten.relu.default, (out.args[0][0],))
        return PassResult(gm=gm, modified=True)


def test_runner_names_the_failing_pass_and_its_predecessors():
    gm = capture(LayoutChains(), {"x": torch.randn(2, 3, 4)})
    with pytest.raises(PassError, match=r"pass 'explodes' \(exact\) failed after fold_views: RuntimeError: boom"):
        run_passes(gm, ctx(), [FoldViews(), Explodes()])


def test_runner_rejects_nodes_without_metadata():
    gm = capture(LayoutChains(), {"x": torch.randn(2, 3, 4)})
    with pytest.raises(PassError, match="careless.*meta\\['val'\\]"):
        run_passes(gm, ctx(), [LeavesNodeWithoutValue()])


def test_disabled_pass_is_skipped_and_optimize_reports_passes():
    gm = capture(LayoutChains(), {"x": torch.randn(2, 3, 4)})
    gm, records = run_passes(gm, ctx(), [FoldViews(), Explodes()], disabled={"explodes"})
    assert [r.name for r in records] == ["fold_views"]

    model = LayoutChains()
    x = torch.randn(2, 3, 4)
    opt = vdopt.optimize(model, disable_passes=["fold_views"])
    assert torch.equal(opt(x), model(x))
    assert "fold_views" not in [r.name for r in opt.plans[0].passes]
    opt = vdopt.optimize(model)
    opt(x)
    report = opt.report()
    assert "fold_views" in report and "folded_chains=2" in report
