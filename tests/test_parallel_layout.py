"""Unit tests of the sharding layout algebra and the ring attention math (no processes)."""

from __future__ import annotations

import pytest
import torch

from vdopt.mesh import AxisGroup
from vdopt.passes.dims.sharded_shape import Dim, Factor, ShardedShape, Split, map_reshape
from vdopt.ring_attention import attention_with_lse, blockwise_attention_with_lse, merge_partial, ring_bytes_sent

RING = AxisGroup(axis="ring", group_name="r", size=2, rank=1)
ULY = AxisGroup(axis="ulysses", group_name="u", size=2, rank=0)


def test_balanced_split_and_coarsen():
    split = Split.balanced(7, (RING, ULY))  # chunk index = ring * 2 + ulysses = 2
    assert split.sizes == (2, 2, 2, 1)
    assert (split.index, split.offset, split.length) == (2, 4, 2)
    assert split.index_with({"ulysses": 1}) == 3
    coarse = split.coarsen()
    assert coarse.axes == (RING,) and coarse.sizes == (4, 3) and coarse.length == 3
    assert coarse.coarsen() is None


def test_reshape_carries_split_factor_across_spatial_temporal_layouts():
    s = Split.balanced(24, (ULY,))
    # Latte: (B*T, S, C) -> (B, T, S, C) -> permute -> (B*S, T, C), B=2, T=3, S=24 split
    lay = ShardedShape((Dim((Factor("B", 2), Factor("T", 3))), Dim((Factor("S", 24, s),)), Dim.plain(64)))
    four = map_reshape(lay, (2, 3, 24, 64))
    assert four.local_shape == (2, 3, 12, 64)
    temporal = map_reshape(four.permute([0, 2, 1, 3]), (48, 3, 64))
    assert [f.label for f in temporal.dims[0].factors] == ["B", "S"]
    assert temporal.local_shape == (24, 3, 64)
    back = map_reshape(temporal, (2, 24, 3, 64))
    assert back.dims[1].factors[0].split == s


def test_reshape_that_cuts_a_split_factor_needs_a_gather():
    s = Split.balanced(24, (ULY,))
    lay = ShardedShape((Dim(), Dim((Factor("S", 24, s),)), Dim.plain(32)))
    assert map_reshape(lay, (1, 3, 8, 32)) is None  # S -> (3, 8): a chunk of 12 cuts a row of 8
    # a cut where every chunk holds whole inner rows keeps the split on the outer part
    # (unpatchify S -> (H, W) with 12 = 2 rows of 6 per rank; a Skiparse regroup)
    rows = map_reshape(lay, (1, 4, 6, 32))
    assert rows.local_shape == (1, 2, 6, 32) and rows.dims[1].factors[0].split.sizes == (2, 2)
    assert map_reshape(rows, (1, 24, 32)).placement() == lay.placement()  # and merges back
    # an unsplit factor may be cut: C -> (heads, head_dim)
    heads = map_reshape(lay, (1, 24, 2, 16))
    assert heads.local_shape == (1, 12, 2, 16)


def test_joint_dim_only_maps_onto_itself():
    s = Split.balanced(72, (ULY,))
    joint = ShardedShape((Dim(), Dim((Factor("TS", 72, s),), pre=10), Dim.plain(64)))
    assert joint.local_shape == (1, 46, 64)
    assert map_reshape(joint, (1, 82, 2, 32)).dims[1] == joint.dims[1]
    assert map_reshape(joint, (82, 64)).local_shape == (46, 64)  # dropping a size-1 dim is fine
    assert map_reshape(joint, (1, 41, 128)) is None


def _reference(q, k, v, mask, scale):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs @ v.double(), lse


def test_attention_with_lse_and_merge_over_key_blocks(rng_inputs):
    g = rng_inputs
    q, k, v = (torch.randn(2, 3, 5, 16, generator=g) for _ in range(3))
    k, v = torch.randn(2, 3, 11, 16, generator=g), torch.randn(2, 3, 11, 16, generator=g)
    mask = torch.rand(2, 1, 5, 11, generator=g) > 0.4
    mask[0, 0, 1] = False  # a query that sees no key at all
    ref_out, ref_lse = _reference(q, k, v, mask, 0.25)
    out, lse = attention_with_lse(q, k, v, mask, 0.25)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    valid = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[valid], ref_lse[valid], rtol=1e-5, atol=1e-6)
    assert torch.isneginf(lse[0, :, 1]).all()
    # merging partial results over disjoint key blocks (one block fully masked for some rows)
    acc_out = acc_lse = None
    for lo, hi in ((0, 4), (4, 5), (5, 11)):
        o, l = attention_with_lse(q, k[..., lo:hi, :], v[..., lo:hi, :], mask[..., lo:hi], 0.25)
        acc_out, acc_lse = merge_partial(acc_out, acc_lse, o, l)
    torch.testing.assert_close(acc_out.double(), ref_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tile_elements", [1, 7, 40, 1 << 20])
def test_blockwise_attention_holds_a_tile_of_scores_and_is_exact(tile_elements, rng_inputs):
    """The plain-math path (CUDA with a mask its backend refuses, value head dims that
    differ) never builds the whole score matrix: tiles as small as one score still give the
    fp64 result, rows with no valid key included."""
    g = rng_inputs
    q, k = torch.randn(2, 3, 9, 16, generator=g), torch.randn(2, 3, 13, 16, generator=g)
    v = torch.randn(2, 3, 13, 8, generator=g)  # Dv != D
    mask = torch.rand(2, 1, 9, 13, generator=g) > 0.5
    mask[1, 0, 4] = False
    ref_out, ref_lse = _reference(q, k, v, mask, 0.3)
    out, lse = blockwise_attention_with_lse(q, k, v, mask, 0.3, tile_elements=tile_elements)
    valid = torch.isfinite(ref_lse)
    torch.testing.assert_close(out.double()[valid], ref_out[valid], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double()[valid], ref_lse[valid], rtol=1e-5, atol=1e-6)
    out, lse = attention_with_lse(q, k, v, mask, 0.3)  # Dv != D takes this path on the CPU
    torch.testing.assert_close(out.double(), ref_out.nan_to_num(0.0), rtol=1e-5, atol=1e-6)
    assert torch.isneginf(lse[1, :, 4]).all() and (out[1, :, 4] == 0).all()


def test_ring_bytes_count_every_block_but_the_last():
    assert ring_bytes_sent([3, 2, 2], rank=0, key_bytes=10) == (3 + 2) * 10  # holds blocks 0, then 2
    assert ring_bytes_sent([3, 2, 2], rank=1, key_bytes=10) == (2 + 3) * 10


@pytest.mark.parametrize("degrees", [dict(ulysses=3), dict(cfg=3, ulysses=1), dict(dsp=2, ulysses=2)])
def test_wrong_degrees_are_value_errors_naming_every_degree(degrees):
    import vdopt

    with pytest.raises(ValueError, match="cfg=.*pipefusion=.*ring=.*ulysses=.*dsp="):
        vdopt.Mesh(**degrees)
