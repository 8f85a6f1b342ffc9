"""The video token grid without a patch embedding convolution: DSP and PipeFusion on linear
patch embeddings and packed token latents, and a clear error where the grid cannot be told.

The grid is found from the graph (``passes/analysis/grid.py``): the reshape that merges a
patchified latent into tokens, a position table whose reshape merges three sizes into the
token count, or three integer arguments of the call whose product is the token count.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vdopt
from vdopt.capture import bind_call, capture
from vdopt.config import PipeFusionConfig
from vdopt.passes.analysis.attention import analyze
from vdopt.passes.analysis.grid import find_grid

import model_matrix
from multirank import run_on_ranks

T, H, W, C, PATCH = 3, 4, 6, 4, 2
"""Tiny video: 3 latent frames of 4 x 6 patches (T, H*W and W all differ)."""


class _Block(nn.Module):
    """Spatial attention (within a frame) or temporal attention (within a patch position)."""

    def __init__(self, dim: int, heads: int, temporal: bool):
        super().__init__()
        self.heads, self.temporal = heads, temporal
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        b, n, d = x.shape
        if not self.temporal:
            return x + self._attend(x.reshape(b * frames, n // frames, d)).reshape(b, n, d)
        t = x.reshape(b, frames, n // frames, d).transpose(1, 2).reshape(b * (n // frames), frames, d)
        return x + self._attend(t).reshape(b, n // frames, frames, d).transpose(1, 2).reshape(b, n, d)


class SpatialTemporalDiT(nn.Module):
    """A spatial-temporal DiT without a convolution, in three latent forms:

    * ``linear``: ``(B, C, T, H*p, W*p)`` patchified by reshape/permute, then a linear embedding;
    * ``packed``: ``(B, T*H*W, C)`` tokens plus ``num_frames``/``height``/``width`` ints and a
      3-D position table built from them (as LTX-Video does);
    * ``flat``: ``(B, N, C)`` tokens and nothing that tells their frames/rows/columns: full
      attention (no frame axis to split).
    """

    def __init__(self, form: str, dim: int = 16, heads: int = 2, blocks: int = 2):
        super().__init__()
        self.form = form
        inputs = C * PATCH * PATCH if form == "linear" else C
        self.embed = nn.Linear(inputs, dim)
        self.pos = nn.Linear(3, dim)
        self.time = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, temporal=i % 2 == 1) for i in range(2 * blocks))
        self.full = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(2 * blocks))
        self.out = nn.Linear(dim, inputs)

    def forward(self, hidden_states, timestep, num_frames: int = 0, height: int = 0, width: int = 0):
        temb = self.time(timestep.view(-1, 1) / 1000.0)[:, None]
        if self.form == "linear":
            b, c, t, hp, wp = hidden_states.shape
            h, w = hp // PATCH, wp // PATCH
            x = hidden_states.reshape(b, c, t, h, PATCH, w, PATCH).permute(0, 2, 3, 5, 1, 4, 6)
            x = self.embed(x.flatten(4)).flatten(1, 3)
        else:
            x, t = self.embed(hidden_states), num_frames
        if self.form == "packed":
            grid = torch.meshgrid(torch.arange(num_frames), torch.arange(height), torch.arange(width), indexing="ij")
            table = torch.stack(grid).float().flatten(1).transpose(0, 1)  # (T*H*W, 3)
            x = x + self.pos(table / 8.0)
        x = x + temb
        for block, qkv in zip(self.blocks, self.full):
            if self.form == "flat":
                b, n, d = x.shape
                q, k, v = qkv(x).view(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
                x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
            else:
                x = block(x, t)
        out = self.out(x)
        if self.form == "linear":
            out = out.view(b, t, h, w, c, PATCH, PATCH).permute(0, 4, 1, 2, 5, 3, 6).reshape(hidden_states.shape)
        return (out,)


def toy(form: str, seed: int = 0):
    torch.manual_seed(seed)
    model = SpatialTemporalDiT(form).eval()
    latent = (torch.randn(1, C, T, H * PATCH, W * PATCH) if form == "linear" else torch.randn(1, T * H * W, C))
    kwargs = dict(hidden_states=latent, timestep=torch.tensor([600.0]))
    if form != "flat":
        kwargs |= dict(num_frames=T, height=H, width=W) if form == "packed" else {}
    return model, kwargs


TWO_BLOCKS = {"LTXVideoTransformer3DModel": dict(num_layers=2), "Kandinsky5Transformer3DModel": dict(num_visual_blocks=2)}
"""The matrix's tiny configs with two blocks: one per PipeFusion stage."""


def diffusers_model(name: str, seed: int):
    import diffusers

    cls = getattr(diffusers, name)
    torch.manual_seed(0)
    model = cls(**{**model_matrix.tiny_config(cls), **TWO_BLOCKS[name]}).eval()
    with torch.no_grad():  # as model_matrix.build_model: no zero gates, so every block reaches the output
        for p in model.parameters():
            if p.numel() and not p.any():
                p.normal_(0.0, 0.2)
    args, kwargs = model_matrix.make_inputs(name, model, 1, torch.Generator().manual_seed(seed))
    return model, bind_call(model, args, kwargs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


# -- finding the grid (one process) -------------------------------------------------------------


@pytest.mark.parametrize("form, how", [("linear", "the reshape flatten"), ("packed", "position tables")])
def test_grid_found_without_a_convolution(form, how):
    model, kwargs = toy(form)
    found = find_grid(capture(model, kwargs).graph)
    assert (found.layout.frames, found.layout.height, found.layout.width) == (T, H, W), found.note
    assert found.layout.source_dim == 1 and how in found.note


def test_grid_from_integer_arguments_and_ambiguity():
    """Flat tokens with sizes only as ints: three ints whose product is the token count; two
    such triples (a fourth int) are ambiguous and named, not guessed."""

    class Sized(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(C, 16)

        def forward(self, hidden_states, num_frames: int, height: int, width: int, extra: int = 1):
            x = self.embed(hidden_states)[:, None].expand(1, 2, -1, -1) * extra
            return F.scaled_dot_product_attention(x, x, x)[:, 0]

    x = torch.randn(1, T * H * W, C)
    found = find_grid(capture(Sized(), dict(hidden_states=x, num_frames=T, height=H, width=W)).graph)
    assert (found.layout.frames, found.layout.height, found.layout.width) == (T, H, W)
    assert "num_frames=3, height=4, width=6" in found.note
    ambiguous = find_grid(capture(Sized(), dict(hidden_states=x, num_frames=T, height=H, width=W, extra=T)).graph)
    assert ambiguous.layout is None
    assert "ambiguously" in ambiguous.note and "T=3 H=4 W=6" in ambiguous.note and "T=4 H=6 W=3" in ambiguous.note


def test_diffusers_grids_without_a_convolution():
    """LTX-Video's packed tokens (position table from its num_frames/height/width) and
    Kandinsky 5's linear patch embedding of a channels-last latent."""
    model, inputs = diffusers_model("LTXVideoTransformer3DModel", 0)
    _, layout = analyze(capture(model, inputs))
    f, h, w = (model_matrix.FRAMES, model_matrix.HEIGHT, model_matrix.WIDTH)
    assert (layout.frames, layout.height, layout.width, layout.source) == (f, h, w, "hidden_states")
    assert layout.text_len == model_matrix.TEXT_LEN  # the packed latent is not text
    model, inputs = diffusers_model("Kandinsky5Transformer3DModel", 0)
    _, layout = analyze(capture(model, inputs))
    assert (layout.frames, layout.height, layout.width) == (f, h // 2, w // 2)


# -- DSP and PipeFusion on real ranks ---------------------------------------------------------


def _pipefusion(model, inputs: dict) -> dict:
    mesh = vdopt.Mesh(pipefusion=2)
    opt = vdopt.optimize(model, mesh, pipefusion=PipeFusionConfig(patches=2, warmup_steps=1))
    with torch.no_grad():
        ref = model(**inputs)[0]
        exact = opt(**inputs)[0]
        program = opt.plans[0].program
        # a pipelined step whose stale K/V are this step's own is exact too
        pipelined = program.run(inputs, program.slots[0], exact=False)[0]
    return {"exact": rel_err(exact, ref), "pipelined": rel_err(pipelined, ref), "axis": program.figures["axis"],
            "counts": dict(program.counts), "stale": len(program.figures["stale_sites"])}


def _dsp(model, inputs: dict) -> dict:
    opt = vdopt.optimize(model, vdopt.Mesh(dsp=2))
    with torch.no_grad():
        err = rel_err(opt(**inputs)[0], model(**inputs)[0])
    return {"exact": err, "report": opt.report()}


def _errors(model, inputs: dict) -> dict:
    found = {}
    for name, kw in (("dsp", dict(mesh=vdopt.Mesh(dsp=2))),
                     ("pipefusion", dict(mesh=vdopt.Mesh(pipefusion=2), pipefusion=PipeFusionConfig(patches=2)))):
        try:
            vdopt.optimize(model, example_inputs=((), inputs), **kw)
            found[name] = None
        except ValueError as e:
            found[name] = str(e)
    opt = vdopt.optimize(model, vdopt.Mesh(ulysses=2))
    with torch.no_grad():
        found["ulysses"] = rel_err(opt(**inputs)[0], model(**inputs)[0])
    return found


def _worker(rank: int, world: int, seed: int) -> dict:
    torch.manual_seed(seed)
    out = {}
    for form in ("linear", "packed"):
        out[f"{form} dsp"] = _dsp(*toy(form, seed))
    for name in ("LTXVideoTransformer3DModel", "Kandinsky5Transformer3DModel"):
        out[f"{name} pipefusion"] = _pipefusion(*diffusers_model(name, seed))
    out["flat"] = _errors(*toy("flat", seed))
    return out


def test_dsp_and_pipefusion_without_a_convolution_on_gloo_ranks():
    results = run_on_ranks(2, _worker, int.from_bytes(os.urandom(4), "little"))
    for rank, r in enumerate(results):
        for case in ("linear dsp", "packed dsp"):
            assert r[case]["exact"] <= 1e-5, (rank, case, r[case]["exact"])
            assert "dsp (T split)" in r[case]["report"] and "dsp (S split)" in r[case]["report"], r[case]["report"]
        for case in ("LTXVideoTransformer3DModel pipefusion", "Kandinsky5Transformer3DModel pipefusion"):
            got = r[case]
            assert got["axis"] == "H" and got["stale"] >= 1 and got["counts"] == {"exact": 1, "pipelined": 1}, (rank, case, got)
            assert got["exact"] <= 1e-5 and got["pipelined"] <= 1e-5, (rank, case, got)
        flat = r["flat"]
        assert flat["ulysses"] <= 1e-5, flat
        for name in ("dsp", "pipefusion"):
            assert flat[name] is not None and "frame/height/width" in flat[name], flat
            assert "arrive flat" in flat[name] and "use ulysses and/or ring" in flat[name].lower(), flat[name]
