"""The temporal_layout pass: temporal blocks run on the unpermuted latent, attention reads 5-D views.

Checked against eager PyTorch (the model itself) and against the same pipeline without the
pass; the kernels run under the Triton interpreter (or the PyTorch reference without Triton).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402

import vdopt  # noqa: E402
import vdopt.ops  # noqa: E402,F401  registers torch.ops.vdopt.*
from vdopt import meta  # noqa: E402
from vdopt.models import build  # noqa: E402
from vdopt.passes.lowering.temporal_layout import find_temporal_regions  # noqa: E402

ATTENTION = torch.ops.vdopt.attention.default
RESHAPES = {torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def copying_reshapes(gm) -> int:
    """Reshapes whose result is not a view of their input: each one is a copy at run time."""
    def storage(node):
        return StorageWeakRef(node.meta["val"].untyped_storage())

    return sum(
        1 for n in gm.graph.nodes
        if n.op == "call_function" and n.target in RESHAPES and storage(n) != storage(n.args[0])
    )


def run(model, args, kwargs, disable=()):
    opt = vdopt.optimize(model, kernels="triton", disable_passes=disable)
    with torch.no_grad():
        out = opt(*args, **kwargs)[0]
    record = next(r for r in opt.plans[0].passes if r.name == "temporal_layout") if not disable else None
    return out, opt.plans[0].program.gm, record


@pytest.mark.parametrize("name", ["latte", "opensora"])
def test_zoo_temporal_blocks_run_unpermuted_and_match_eager(name):
    # batch 2 (a CFG pair): the (B, T, HW, C) <-> (B*HW, T, C) reshapes are real copies
    model, args, kwargs = build(name, "tiny", batch=2)
    with torch.no_grad():
        eager = model(*args, **kwargs)[0]
    out, gm, record = run(model, args, kwargs)
    base_out, base_gm, _ = run(model, args, kwargs, disable=("temporal_layout",))
    blocks = sum(1 for n in gm.graph.nodes if meta.SITE in n.meta and n.meta[meta.SITE].kind == "temporal")

    assert rel(out, eager) <= 1e-5 and rel(base_out, eager) <= 1e-5
    assert blocks == 2 and record.stats["regions"] == blocks and record.stats["attention_sites"] == blocks
    temporal = [n for n in gm.graph.nodes if n.target == ATTENTION and n.meta[meta.SITE].kind == "temporal"]
    # (B, HW, N, T, D) views of the projections, read in place
    assert all(a.meta["val"].dim() == 5 and not a.meta["val"].is_contiguous() for n in temporal for a in n.args[:3])
    # entry and exit of every temporal block no longer copy
    assert copying_reshapes(gm) <= copying_reshapes(base_gm) - 2 * blocks


class TemporalBlock(nn.Module):
    """Latte/Open-Sora style: adaLN per sequence, frame embedding, fused QKV, q/k RMSNorm, rotary
    embedding on frames, MLP. ``leak`` reads a region tensor with an op the pass does not move."""

    def __init__(self, dim=48, heads=3, frames=5, leak=False):
        super().__init__()
        self.heads, self.leak = heads, leak
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.RMSNorm(dim // heads), nn.RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.frame_embed = nn.Parameter(torch.randn(frames, dim) * 0.1)
        half = dim // heads // 2
        angles = torch.arange(frames)[:, None] * (10000.0 ** (-torch.arange(half) / half))[None, :]
        self.register_buffer("cos", angles.cos().repeat_interleave(2, -1))
        self.register_buffer("sin", angles.sin().repeat_interleave(2, -1))

    def rotate(self, x):
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        return x * self.cos + rotated * self.sin

    def forward(self, x, shift, scale):
        b, t, hw, c = x.shape
        x = x.permute(0, 2, 1, 3).reshape(b * hw, t, c) + self.frame_embed
        h = self.norm(x) * (1 + scale.repeat_interleave(hw, 0)[:, None]) + shift.repeat_interleave(hw, 0)[:, None]
        q, k, v = self.qkv(h).view(b * hw, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.rotate(self.q_norm(q)), self.rotate(self.k_norm(k))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * hw, t, c)
        x = x + self.proj(o)
        x = x + self.mlp(self.norm(x))
        out = x.reshape(b, hw, t, c).permute(0, 2, 1, 3)
        return (out, x.mean(1)) if self.leak else out


def test_rewrites_odd_sized_block_exactly_and_keeps_what_it_cannot_move(rng_inputs):
    x = torch.randn(2, 5, 7, 48, generator=rng_inputs)  # B=2, T=5, HW=7 (odd on purpose)
    shift, scale = torch.randn(2, 48, generator=rng_inputs), torch.randn(2, 48, generator=rng_inputs) * 0.1
    for leak, expected in ((False, {"regions": 1, "attention_sites": 1}), (True, {"kept_mean": 1})):
        torch.manual_seed(0)
        block = TemporalBlock(leak=leak).eval()
        with torch.no_grad():
            eager = block(x, shift, scale)
            opt = vdopt.optimize(block, kernels="triton")
            got = opt(x, shift, scale)
        record = next(r for r in opt.plans[0].passes if r.name == "temporal_layout")
        assert {k: v for k, v in record.stats.items() if v} == expected
        for a, b in zip(pytree_leaves(got), pytree_leaves(eager)):
            assert a.shape == b.shape and rel(a, b) <= 1e-5
        if not leak:  # the block's output is the region's own (B, T, HW, C) tensor: no copy back
            assert got.is_contiguous()
            assert not find_temporal_regions(opt.plans[0].program.gm.graph)


def test_not_run_without_the_triton_lowering():
    model, args, kwargs = build("latte", "tiny")
    opt = vdopt.optimize(model, kernels="sdpa")
    with torch.no_grad():
        opt(*args, **kwargs)
    record = next(r for r in opt.plans[0].passes if r.name == "temporal_layout")
    assert not record.modified
    assert all(n.target != ATTENTION for n in opt.plans[0].program.gm.graph.nodes)


def pytree_leaves(value):
    return torch.utils._pytree.tree_leaves(value)


def test_pab_regions_survive_the_temporal_rewrite(rng_inputs):
    """PAB over folded temporal blocks: the same steps as with SDPA, temporal attention reused."""
    from test_pab import LATTE_CONFIG, TIMESTEPS, denoise, latte

    model, x, text = latte(rng_inputs, batch=2)
    lowered = vdopt.optimize(model, pab=LATTE_CONFIG, kernels="triton")
    plain = vdopt.optimize(model, pab=LATTE_CONFIG, kernels="sdpa")
    for step, (a, b) in enumerate(zip(denoise(lowered, x, text, TIMESTEPS), denoise(plain, x, text, TIMESTEPS))):
        assert rel(a, b) <= 1e-5, f"step {step}"
    program = lowered.plans[0].program
    assert next(r for r in lowered.plans[0].passes if r.name == "temporal_layout").stats["regions"] == 2
    assert program.counts["temporal"]["reused"] > 0
    assert program.counts == plain.plans[0].program.counts
