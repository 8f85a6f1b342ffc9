"""Reductions over a split dim on real gloo ranks: partial results, then an all-reduce.

A sum, mean, max or min over the split tokens, and a matmul or einsum contracting them (the
``K^T V`` of linear attention), run on each rank's own tokens and are completed by an
all-reduce; per-token ops that read the reduced value (``Q (K^T V)``) stay split. Each case
shards one input along its token dim with ``ShardPropagator`` (the dimension core, no model
analysis), runs the rewritten graph on 2 ranks and compares with eager PyTorch, for an even
and an uneven token count (8 and 7: the ranks hold 4+4 and 4+3 tokens), and with zero
padding grown onto the last rank's chunk.

Ops along a whole dim of split tokens (sort, gather, flip, tiling, lookups, outer products,
slices of replicated text rows beside the tokens) run with no collective at all; picking along
the split dim gathers first. With the batch split instead (CFG parallel), a loop over the
samples runs each rank's own iteration and joins the results with no collective.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multirank import run_on_ranks

RTOL = 1e-5


def token_sum(x, w):
    return x.sum(dim=1) @ w


def token_mean_keepdim(x, w):
    return x - x.mean(dim=1, keepdim=True) @ w  # per-token op on the replicated mean stays split


def token_max(x, w):
    return torch.amax(x @ w, dim=1) + torch.amin(x, dim=-2)


def sum_all(x, w):
    return (x @ w).sum() * x


def kv_contraction(x, w):
    q, k, v = F.relu(x @ w), F.relu(x @ w.t()), x @ (w + 1)
    kv = k.transpose(1, 2) @ v  # (B, C, C): contracts the split tokens
    return q @ kv  # split along the tokens again


def einsum_contraction(x, w):
    kv = torch.einsum("bnc,bnd->bcd", x, x @ w)
    return torch.einsum("bnc,bcd->bnd", x, kv)


def sana_linear_attention(x, w):
    """diffusers' ``SanaLinearAttnProcessor2_0`` on (B, N, C) tokens, 2 heads."""
    q, k, v = (t.transpose(1, 2).unflatten(1, (2, -1)) for t in (x @ w, x @ w.t(), x))
    k = F.relu(k).transpose(2, 3)
    v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)  # a row of ones: the normalizer
    out = torch.matmul(torch.matmul(v, k), F.relu(q))
    out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
    return out.flatten(1, 2).transpose(1, 2)


def padded_mean(x, w):
    """Zero rows padded onto the end of the tokens (a Skiparse block's padding, on the last
    rank only): they count in the mean's global count and add nothing to its sum."""
    y = F.pad(x @ w, (0, 0, 0, 3))
    return y.mean(dim=1, keepdim=True) * y


def right_operand_split(x, w):
    """The split tokens as the right operand's columns: (C, C) @ (B, C, N)."""
    return (w @ x.transpose(1, 2)).transpose(1, 2)


def sort_channels(x, w):
    """Sorting, and picking by the order, along the (whole) channels of split tokens: local."""
    values, order = torch.sort(x @ w, dim=-1)
    return values + torch.gather(x, -1, order) + torch.argsort(x, dim=-1, stable=True).to(x.dtype)


def empty_reshape(x, w):
    """A reshape of no values (split tokens, 0 channels): every rank's empty result is whole."""
    return x @ w + x[:, :, :0].reshape(-1).sum()


def tile_flip_narrow(x, w):
    """Tiling, flipping, narrowing and logical ops along whole dims of split tokens: local."""
    y = torch.flip(x @ w, dims=[-1]).repeat(2, 1, 2)[:2, :, :8] + torch.narrow(x, 2, 1, 7).repeat(1, 1, 2)[..., :8]
    return y * ((x > 0) & (x < 1)).to(x.dtype)


def lookup_outer(x, w):
    """An embedding looked up by split token ids, and an outer product with split tokens: local."""
    ids = (x[..., 0].abs() * 3).long().clamp(max=7)
    return F.embedding(ids, w) + torch.outer(x[0, :, 0], w[0])


def text_then_tokens(x, w):
    """Replicated text rows before the split tokens, then each part sliced back out: local."""
    y = torch.cat([w[:3].expand(x.shape[0], 3, 8), x @ w], dim=1)
    return y[:, 3:] * y[:, :3].sum(1, keepdim=True)


def gather_tokens(x, w):
    """Picking along the split tokens: gathered first (exact)."""
    order = torch.arange(x.shape[1] - 1, -1, -1).expand(x.shape[0], -1).unsqueeze(-1).expand_as(x)
    return torch.gather(x @ w, 1, order)


def gather_first_tokens(x, w):
    """Picking along whole channels with an index for the first 3 tokens only: the index covers
    part of the split tokens, so they are gathered first (exact)."""
    order = torch.arange(x.shape[2] - 1, -1, -1).expand(x.shape[0], 3, -1)
    return torch.gather(x @ w, 2, order)


CASES = {f.__name__: f for f in (token_sum, token_mean_keepdim, token_max, sum_all, kv_contraction,
                                  einsum_contraction, sana_linear_attention, padded_mean, right_operand_split)}
LOCAL_CASES = {f.__name__: f for f in (sort_channels, empty_reshape, tile_flip_narrow, lookup_outer, text_then_tokens)}
"""Ops that mix values along a whole dim of split tokens: no collective at all."""
GATHERED_CASES = {"gather_tokens": (gather_tokens, "picks along a split dim"),
                  "gather_first_tokens": (gather_first_tokens, "covers only part of the input")}
"""Ops that must gather first, and the reason their rule gives."""


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, w):
        return self.fn(x, w)


def per_sample_loop(x, w):
    """A loop over the samples of a split batch (diffusers' Mochi attention): each rank runs its
    own sample's iteration, the others on empty tensors; the results joined in rank order."""
    return torch.cat([(x[i:i + 1] @ w).softmax(-1) * (i + 1) for i in range(x.shape[0])])


def per_sample_split(x, w):
    """The same loop over ``x.split(1)``."""
    return torch.cat([torch.flip(part @ w, dims=[1]) for part in x.split(1)])


BATCH_CASES = {f.__name__: f for f in (per_sample_loop, per_sample_split)}
"""Run with the batch split (CFG parallel) instead of the tokens: no collective at all."""


def _run(rank: int, world: int, tokens_list: tuple[int, ...]) -> dict:
    import vdopt
    from vdopt.collectives import communication
    from vdopt.passes.dims.propagation import ShardPropagator
    from vdopt.passes.dims.sharded_shape import Dim, Factor, ShardedShape, Split

    group = vdopt.Mesh(ulysses=world).axis_groups(torch.device("cpu"))["ulysses"]
    out = {}
    for tokens in tokens_list:
        gen = torch.Generator().manual_seed(tokens)
        x = torch.randn(2, tokens, 8, generator=gen, dtype=torch.float64)
        w = torch.randn(8, 8, generator=gen, dtype=torch.float64) / 3
        split_tokens = ShardedShape((Dim.plain(2), Dim((Factor("TS", tokens, Split.balanced(tokens, (group,))),)), Dim.plain(8)))
        split_batch = ShardedShape((Dim((Factor("B", 2, Split.balanced(2, (group,))),)), Dim.plain(tokens), Dim.plain(8)))
        cases = {name: (fn, split_tokens) for name, fn in (CASES | LOCAL_CASES).items()}
        cases |= {name: (fn, split_tokens) for name, (fn, _) in GATHERED_CASES.items()}
        cases |= {name: (fn, split_batch) for name, fn in BATCH_CASES.items()}
        for name, (fn, layout) in cases.items():
            gm = torch.export.export(_Fn(fn), (x, w)).module()
            xs = next(n for n in gm.graph.nodes if n.op == "placeholder")
            prop = ShardPropagator(gm, created_by="test")
            prop.shard(xs, layout, skip=lambda u: u.op == "call_module")  # export's guards check the whole input
            prop.run()
            gm.graph.eliminate_dead_code()
            gm.recompile()
            with torch.no_grad():
                got, ref = gm(x, w), fn(x, w)
            kinds = [c.kind for c in communication(gm)]
            err = float((got - ref).abs().max() / ref.abs().max())
            out[(name, tokens)] = {"err": err, "all_reduce": kinds.count("all_reduce"),
                                   "gathers": list(prop.gather_reasons),
                                   "collectives": [c.kind for c in communication(gm) if c.purpose != "output"]}
    return out


@pytest.fixture(scope="module")
def outcomes():
    return run_on_ranks(2, _run, (8, 7), timeout=600)


@pytest.mark.parametrize("tokens", [8, 7])
@pytest.mark.parametrize("name", list(CASES))
def test_reduction_over_split_tokens(outcomes, name: str, tokens: int) -> None:
    for rank, per_rank in enumerate(outcomes):
        o = per_rank[(name, tokens)]
        assert o["err"] <= RTOL, f"rank {rank}: relative error {o['err']:.2e}"
        if name == "right_operand_split":
            assert o["all_reduce"] == 0, f"rank {rank}: nothing is contracted over the tokens"
        else:
            assert o["all_reduce"] >= 1, f"rank {rank}: no all-reduce (the reduction was gathered)"
        assert not o["gathers"], f"rank {rank}: gathered before {o['gathers']}"


@pytest.mark.parametrize("tokens", [8, 7])
@pytest.mark.parametrize("name", list(LOCAL_CASES) + list(GATHERED_CASES) + list(BATCH_CASES))
def test_ops_along_a_dim_of_split_tokens(outcomes, name: str, tokens: int) -> None:
    for rank, per_rank in enumerate(outcomes):
        o = per_rank[(name, tokens)]
        assert o["err"] <= RTOL, f"rank {rank}: relative error {o['err']:.2e}"
        if name in LOCAL_CASES or name in BATCH_CASES:
            assert not o["gathers"] and not o["collectives"], f"rank {rank}: {o['gathers']} {o['collectives']}"
        else:
            assert o["gathers"] and GATHERED_CASES[name][1] in o["gathers"][0], f"rank {rank}: {o['gathers']}"
