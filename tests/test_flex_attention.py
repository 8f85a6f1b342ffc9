"""flex attention under Ulysses and CFG parallel: head-parallel (or per sample) where valid,
gathered (and still exact) where not.

A tiny video model (Conv3d patch embedding, 45 tokens: uneven over 2 ranks) with three flex
attentions, each with a block mask made by a frame-causal ``mask_mod`` and a ``score_mod``,
on 2 real gloo ranks against the eager model on one device:

* ``attn1`` (3 heads: uneven over the ranks): mask and score ignore the head; Q/K/V go
  sequence -> heads by all-to-all, no token is gathered before it;
* ``attn2`` (4 query heads, 2 K/V heads): ``score_mod`` reads a per-head scale (a captured
  buffer indexed by ``h``) and the block mask has one entry per head from a ``mask_mod``
  reading ``h``: head-parallel too, the subgraphs given global head indices;
* ``attn3`` (6 query heads, 3 K/V heads: the groups do not divide over 2 ranks): its tokens
  are gathered before it, and the report says why.

Under ``cfg=2`` (batch 2, one sample per rank) ``attn2``'s ``score_mod`` and ``mask_mod`` also
read the sample index ``b`` and its block mask has one entry per sample: all three attentions
run on the rank's own sample (rank 1's subgraphs given global sample indices), nothing is
gathered before them.
"""

from __future__ import annotations

import pytest
import torch

from multirank import run_on_ranks

RTOL = 1e-5
FRAMES, HEIGHT, WIDTH, PATCH = 3, 6, 10, 2
TOKENS_PER_FRAME = (HEIGHT // PATCH) * (WIDTH // PATCH)


def _frame_causal(b, h, q_idx, kv_idx):
    return q_idx // TOKENS_PER_FRAME >= kv_idx // TOKENS_PER_FRAME


def _frame_causal_but_head_0_of_sample_1(b, h, q_idx, kv_idx):
    return (q_idx // TOKENS_PER_FRAME >= kv_idx // TOKENS_PER_FRAME) | ((h == 0) & (b == 1))


class FlexSelfAttention(torch.nn.Module):
    """Self-attention by flex attention; ``per_head``: a ``score_mod`` reading a per-head scale
    (a captured buffer indexed by ``h``) and the sample index, and a block mask per sample and
    head from a ``mask_mod`` reading both; ``kv_heads``: grouped-query attention."""

    def __init__(self, dim: int, heads: int, *, per_head: bool = False, kv_heads: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.per_head = heads, kv_heads or heads, per_head
        head_dim = dim // heads
        self.to_q = torch.nn.Linear(dim, dim)
        self.to_kv = torch.nn.Linear(dim, 2 * self.kv_heads * head_dim)
        self.to_out = torch.nn.Linear(dim, dim)
        self.register_buffer("head_scale", torch.linspace(0.5, 1.5, heads))

    def forward(self, x):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        n = x.shape[1]
        q = self.to_q(x).unflatten(2, (self.heads, -1)).transpose(1, 2)
        k, v = self.to_kv(x).unflatten(2, (2, self.kv_heads, -1)).permute(2, 0, 3, 1, 4)
        if self.per_head:
            mask = create_block_mask(_frame_causal_but_head_0_of_sample_1, x.shape[0], self.heads, n, n, device=x.device)
            scale = self.head_scale

            def score_mod(score, b, h, q_idx, kv_idx):
                return score * scale[h] * (1 + 0.5 * b) - 0.01 * (q_idx - kv_idx)
        else:
            mask = create_block_mask(_frame_causal, None, None, n, n, device=x.device)

            def score_mod(score, b, h, q_idx, kv_idx):
                return score - 0.01 * (q_idx - kv_idx).abs()
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=self.kv_heads != self.heads)
        return self.to_out(out.transpose(1, 2).flatten(2))


class TinyFlexVideo(torch.nn.Module):
    def __init__(self, channels: int = 4, dim: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.embed = torch.nn.Conv3d(channels, dim, (1, PATCH, PATCH), (1, PATCH, PATCH))
        self.attn1 = FlexSelfAttention(dim, heads)
        self.attn2 = FlexSelfAttention(dim, heads + 1, per_head=True, kv_heads=(heads + 1) // 2)
        self.attn3 = FlexSelfAttention(dim, 2 * heads, kv_heads=heads)
        self.proj_out = torch.nn.Linear(dim, channels * PATCH * PATCH)

    def forward(self, x):
        b, c, t, h, w = x.shape
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.attn1(tokens)
        tokens = tokens + self.attn2(tokens)
        tokens = tokens + self.attn3(tokens)
        y = self.proj_out(tokens).reshape(b, t, h // PATCH, w // PATCH, c, PATCH, PATCH)
        return y.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, t, h, w)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _run(mesh, batch: int) -> dict:
    import vdopt
    from vdopt.collectives import communication
    from vdopt.passes.analysis.attention import module_path

    model = TinyFlexVideo().eval()
    x = torch.randn(batch, 4, FRAMES, HEIGHT, WIDTH)
    with torch.no_grad():
        ref = model(x)  # the whole batch: attn2 reads the sample index, so a sample alone differs
        opt = vdopt.optimize(model, mesh)
        out = opt(x)
    gm = opt.plans[0].program.gm
    gm = getattr(gm, "gm", gm)
    flex = {module_path(n): n.name for n in gm.graph.nodes if n.target is torch.ops.higher_order.flex_attention}
    record = next((r for r in opt.plans[0].passes if r.name == "sequence_parallel"), None)
    return {"err": _rel(out, ref),
            "comms": [(c.kind, c.purpose) for c in communication(gm)],
            "flex_nodes": flex, "flex_stats": record.stats.get("flex_attention", {}) if record else {}}


def _on_ranks(rank: int, world: int) -> dict:
    import warnings

    import vdopt

    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    torch.manual_seed(0)
    return {"ulysses": _run(vdopt.Mesh(ulysses=world), 1), "cfg": _run(vdopt.Mesh(cfg=world), world)}


@pytest.fixture(scope="module")
def outcomes() -> list[dict]:
    return run_on_ranks(2, _on_ranks, timeout=600)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_per_sample_under_cfg(outcomes) -> None:
    for rank, got in enumerate(r["cfg"] for r in outcomes):
        assert got["err"] <= RTOL, f"rank {rank}: relative error {got['err']:.2e}"
        # only the output is gathered (over the batch): no flex attention runs on the whole batch
        assert [kind for kind, _ in got["comms"]] == ["all_gather"], got["comms"]
        assert got["comms"][0][1] == "output", got["comms"]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_head_parallel_under_ulysses(outcomes) -> None:
    for rank, got in enumerate(r["ulysses"] for r in outcomes):
        assert got["err"] <= RTOL, f"rank {rank}: relative error {got['err']:.2e}"
        comms, stats, nodes = got["comms"], got["flex_stats"], got["flex_nodes"]
        # attn1 and attn2: Q, K, V sequence -> heads and the output back, no gather before them
        for name in ("attn1", "attn2"):
            assert comms.count(("all_to_all", name)) == 4, comms
            assert stats[name].startswith("ulysses"), stats
            gathers = [c for c in comms if c[0] == "all_gather" and c[1] in (name, f"gather before {nodes[name]}")]
            assert not gathers, comms
        assert "score_mod (head), mask_mod (head) given global indices" in stats["attn2"], stats
        # attn3 (grouped-query heads that do not divide): q, k and v gathered, and the report says why
        assert comms.count(("all_gather", f"gather before {nodes['attn3']}")) == 3, comms
        assert not [c for c in comms if c[1] == "attn3"], comms
        assert "grouped-query" in stats["attn3"], stats
