"""AOT artifacts and compiled execution.

Saved artifacts load in a fresh process without the model's code and match: eager outputs
(one rank; two gloo ranks with Ulysses), the output structure, and PAB's step behaviour.
Every mismatch case fails with its own error, and an interrupted save leaves nothing that
loads. AOTInductor builds C++ on the CPU, so the model is tiny and each artifact is
compiled once per module.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from multirank import run_on_ranks

import vdopt
from vdopt.artifacts import ArtifactError, program_parts, read_manifest
from vdopt.compile import CompiledGraph

TESTS_DIR = Path(__file__).resolve().parent

# Only spatial (full) attention is broadcast: two variants, compute_all and reuse_spatial.
PAB = vdopt.PABConfig(spatial_range=2, temporal_range=None, cross_range=None)
TIMESTEPS = (900.0, 700.0, 600.0, 400.0, 50.0)
"""Call 0 computes; 700, 600 and 400 are inside (100, 800): call 2 computes, 1 and 3 reuse."""


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim or dim, dim)
        self.to_v = nn.Linear(kv_dim or dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, S, C = x.shape
        q = self.to_q(x).view(B, S, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(B, S, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, text_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, text_dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, text: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x) + shift)
        x = x + self.attn2(self.norm2(x), text)
        return x + self.ff(x)


class ToyVideoDiT(nn.Module):
    """A one-block video DiT: patch conv (1x2x2), space-time self-attention, cross-attention."""

    def __init__(self, channels: int = 4, dim: int = 32, heads: int = 2, text_dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv3d(channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.time = nn.Sequential(nn.Linear(32, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.block = Block(dim, heads, text_dim)
        self.out = nn.Linear(dim, channels * 4)

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=True):
        B, C, T, H, W = hidden_states.shape
        x = self.patch(hidden_states).flatten(2).transpose(1, 2)
        freqs = torch.exp(-math.log(10000.0) * torch.arange(16, dtype=torch.float32) / 16)
        angles = timestep.float()[:, None] * freqs[None]
        shift = self.time(torch.cat([angles.sin(), angles.cos()], dim=-1))[:, None]
        x = self.block(x, encoder_hidden_states, shift)
        x = self.out(x).view(B, T, H // 2, W // 2, C, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(B, C, T, H, W)
        return {"sample": x} if return_dict else (x,)


def toy_model() -> ToyVideoDiT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ToyVideoDiT().eval()


def toy_inputs(timestep: float = 500.0, *, height: int = 8, seed: int | None = None) -> dict:
    g = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    return {
        "hidden_states": torch.randn(1, 4, 3, height, 8, generator=g),
        "timestep": torch.tensor([timestep]),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
    }


def toy_factory():
    """For ``vdopt compile tests.test_artifacts:toy_factory``: (model, args, kwargs)."""
    inputs = toy_inputs(seed=3)
    return toy_model(), (), {**inputs, "return_dict": False}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- one rank, PAB: saved once for the module -----------------------------------------------------

@pytest.fixture(scope="module")
def pab_artifact(tmp_path_factory):
    model = toy_model()
    calls = [toy_inputs(t) for t in TIMESTEPS]
    opt = vdopt.optimize(model, pab=PAB, compile=False)
    opt(**calls[0])
    path = opt.save(tmp_path_factory.mktemp("artifacts") / "toy_pab")
    opt.reset()
    with torch.no_grad():
        expected = [opt(**c)["sample"] for c in calls]
        eager = [model(**c)["sample"] for c in calls]
    return {"path": path, "calls": calls, "expected": expected, "eager": eager, "summary": opt.plans[0].program.summary()}


def test_save_writes_manifest_packages_and_weights(pab_artifact):
    manifest = read_manifest(pab_artifact["path"])
    plan = manifest["plans"][0]
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["mesh"]["world_size"] == 1 and manifest["device"]["type"] == "cpu"
    assert manifest["pab_schedule"] == {"spatial": {"range": 2, "window": [100.0, 800.0]}}
    assert sorted(plan["variants"]) == ["compute_all", "reuse_spatial"]
    assert [p["name"] for p in manifest["call"]] == ["hidden_states", "timestep", "encoder_hidden_states", "return_dict"]
    # One weights file shared by both variants; the reuse variant needs fewer constants.
    needs = {name: set(v["constants"][0]) for name, v in plan["variants"].items()}
    assert needs["reuse_spatial"] < needs["compute_all"]
    assert "block.attn1.to_q.weight" not in needs["reuse_spatial"]
    saved = torch.load(pab_artifact["path"] / "weights.rank0.pt")
    assert len(saved) == len(needs["compute_all"])
    assert not [p for p in pab_artifact["path"].parent.iterdir() if p.name.startswith(".")]  # no leftovers


def test_load_in_fresh_process_matches_eager_outputs_and_pab_steps(pab_artifact, tmp_path):
    io = tmp_path / "io.pt"
    torch.save({"calls": pab_artifact["calls"]}, io)
    script = textwrap.dedent(f"""
        import sys, torch, vdopt
        io = torch.load({str(io)!r})
        m = vdopt.load({str(pab_artifact["path"])!r})
        outs = [m(**c) for c in io["calls"]]
        m.reset()
        again = m(**io["calls"][0])
        foreign = [n for n in sys.modules if n.startswith(("test_artifacts", "tests"))]
        torch.save({{"outs": outs, "again": again, "summary": m.plans[0].program.summary(),
                    "report": m.report(), "foreign": foreign}}, {str(tmp_path / "out.pt")!r})
    """)
    # A fresh interpreter outside the tests directory: the model class cannot be imported.
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, timeout=300)
    got = torch.load(tmp_path / "out.pt")
    assert got["foreign"] == []
    assert all(isinstance(o, dict) and list(o) == ["sample"] for o in got["outs"])  # output structure
    for out, expected in zip(got["outs"], pab_artifact["expected"]):
        assert rel(out["sample"], expected) <= 1e-5
    # Computing calls equal eager; reusing calls differ from eager (the broadcast is real).
    assert rel(got["outs"][0]["sample"], pab_artifact["eager"][0]) <= 1e-5
    assert rel(got["outs"][2]["sample"], pab_artifact["eager"][2]) <= 1e-5
    assert rel(got["outs"][1]["sample"], pab_artifact["eager"][1]) > 1e-4
    assert rel(got["again"]["sample"], pab_artifact["expected"][0]) <= 1e-5  # reset starts over
    # Both ran 6 calls: the schedule (3 computed, 2 reused) and one computing call at t=900.
    assert got["summary"]["pab spatial"] == pab_artifact["summary"]["pab spatial"]
    assert "computed 4, reused 2" in got["summary"]["pab spatial"]
    assert "compute_all, reuse_spatial" in got["report"]


def _broken_copy(src: Path, dst: Path, case: str) -> Path:
    shutil.copytree(src, dst)
    manifest_path = dst / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if case == "no manifest":
        manifest_path.unlink()
    elif case == "truncated package":
        package = dst / manifest["plans"][0]["variants"]["compute_all"]["packages"][0]["path"]
        package.write_bytes(package.read_bytes()[: package.stat().st_size // 2])
    elif case == "missing weights":
        (dst / "weights.rank0.pt").unlink()
    elif case == "other torch":
        manifest["versions"]["torch"] = "2.0.0+cu118"
    elif case == "other world size":
        manifest["mesh"] = {"degrees": {**manifest["mesh"]["degrees"], "ulysses": 2}, "world_size": 2}
    elif case == "other device":
        manifest["device"] = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": [9, 0]}
    elif case == "corrupt manifest":
        manifest_path.write_text("{ not json")
        return dst
    if manifest_path.exists():
        manifest_path.write_text(json.dumps(manifest))
    return dst


BROKEN = {
    "no manifest": "no manifest.json: it is not a vdopt artifact, or its save did not finish",
    "truncated package": r"compute_all.rank0.pt2 .* bytes but .* were saved \(truncated",
    "missing weights": "incomplete: weights.rank0.pt is missing",
    "other torch": "compiled with torch 2.0.0\\+cu118, this process runs torch",
    "other world size": r"saved for 2 rank\(s\) \(Mesh\(.*ulysses=2.*\)\) but this process group has 1",
    "other device": "compiled for CUDA .* but CUDA is not available" if not torch.cuda.is_available() else "sm",
    "corrupt manifest": "manifest.json is corrupt",
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_load_mismatch_says_what_and_what_to_do(pab_artifact, tmp_path, case):
    broken = _broken_copy(pab_artifact["path"], tmp_path / "copy", case)
    with pytest.raises(ArtifactError, match=BROKEN[case]):
        vdopt.load(broken)


def test_load_missing_path_and_call_with_other_inputs(pab_artifact, tmp_path):
    with pytest.raises(ArtifactError, match="no artifact at"):
        vdopt.load(tmp_path / "nowhere")
    m = vdopt.load(pab_artifact["path"])
    with pytest.raises(ArtifactError, match=r"input \['hidden_states'\]: got float32\[1, 4, 3, 16, 8\] .* saved for float32\[1, 4, 3, 8, 8\]"):
        m(**toy_inputs(500.0, height=16))
    with pytest.raises(ArtifactError, match="this call passes return_dict=False, which the saved call did not"):
        m(**toy_inputs(500.0), return_dict=False)
    with pytest.raises(TypeError, match="missing a required argument: 'encoder_hidden_states'"):
        m(torch.randn(1, 4, 3, 8, 8), torch.tensor([500.0]))
    # Positional and keyword calls bind alike, as for the model itself.
    c = pab_artifact["calls"][0]
    assert rel(m(c["hidden_states"], c["timestep"], c["encoder_hidden_states"])["sample"], pab_artifact["eager"][0]) <= 1e-5


SAVE_THEN_HANG = """
import sys, torch, vdopt
sys.path.insert(0, {tests!r})
from test_artifacts import toy_factory
model, args, kwargs = toy_factory()
opt = vdopt.optimize(model, example_inputs=(args, kwargs), compile=False)
opt.save({target!r})
"""


def test_interrupted_save_leaves_nothing_loadable(tmp_path):
    target = tmp_path / "toy"
    proc = subprocess.Popen([sys.executable, "-c", SAVE_THEN_HANG.format(tests=str(TESTS_DIR), target=str(target))],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        partial = []
        while not partial and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            partial = [p for p in tmp_path.iterdir() if p.name.startswith(".toy.partial-")]
        assert partial, "the save never started writing"
        proc.send_signal(signal.SIGKILL)  # mid-save: the packages are being compiled
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not target.exists()
    with pytest.raises(ArtifactError, match="no artifact at"):
        vdopt.load(target)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        vdopt.load(partial[0])


def test_save_refuses_before_a_call_and_over_other_files(tmp_path):
    opt = vdopt.optimize(toy_model(), compile=False)
    with pytest.raises(ArtifactError, match="nothing to save yet"):
        opt.save(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    opt(**toy_inputs())
    with pytest.raises(ArtifactError, match="exists and is not a vdopt artifact"):
        opt.save(tmp_path / "b")
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_cli_compile_zoo_factory_round_trip(tmp_path):
    from vdopt.cli import main

    out = tmp_path / "cli"
    assert main(["compile", "test_artifacts:toy_factory", "--out", str(out), "--device", "cpu"]) == 0
    model, args, kwargs = toy_factory()
    loaded = vdopt.load(out)
    got = loaded(*args, **kwargs)
    with torch.no_grad():
        want = model(*args, **kwargs)
    assert isinstance(got, tuple) and len(got) == 1
    assert rel(got[0], want[0]) <= 1e-5
    assert read_manifest(out)["plans"][0]["program"] == "graph"


# -- two gloo ranks, Ulysses ------------------------------------------------------------------------

def _save_ulysses(rank: int, world: int, path: str, inputs: dict):
    model = toy_model()
    opt = vdopt.optimize(model, vdopt.Mesh(ulysses=2), compile=False)
    out = opt(**inputs)["sample"]
    opt.save(path)
    with torch.no_grad():
        return out, model(**inputs)["sample"]


def _load_ulysses(rank: int, world: int, path: str, inputs: dict):
    m = vdopt.load(path)  # a fresh process: builds the mesh's groups, checks their names
    out = m(**inputs)["sample"]
    with pytest.raises(ArtifactError, match=r"saved for Mesh\(.*ulysses=2.*\) but vdopt.load got Mesh\(cfg=2"):
        vdopt.load(path, vdopt.Mesh(cfg=2))
    return out, read_manifest(path)["process_groups"][rank]


def test_two_rank_ulysses_artifact_matches_eager(tmp_path):
    inputs = toy_inputs(500.0)
    path = str(tmp_path / "toy_ulysses")
    saved = run_on_ranks(2, _save_ulysses, path, inputs, timeout=600)
    manifest = read_manifest(path)
    assert manifest["mesh"]["degrees"]["ulysses"] == 2 and manifest["mesh"]["world_size"] == 2
    assert sorted(p.name for p in Path(path).rglob("*.pt2")) == ["main.rank0.pt2", "main.rank1.pt2"]
    loaded = run_on_ranks(2, _load_ulysses, path, inputs, timeout=300)
    for (out, eager), (got, groups) in zip(saved, loaded):
        assert rel(out, eager) <= 1e-5
        assert rel(got, eager) <= 1e-5
        assert groups and all(ranks == [0, 1] for ranks in groups.values())  # the ulysses group


# -- compiled execution -----------------------------------------------------------------------------

def test_compile_option_runs_inductor_once_and_keeps_the_graph_for_save():
    model = toy_model()
    default = vdopt.optimize(model)
    default(**toy_inputs())
    assert isinstance(default.plans[0].program.gm, torch.fx.GraphModule)  # CPU default: not compiled
    with pytest.raises(ValueError, match="compile='yes'"):
        vdopt.optimize(model, compile="yes")

    opt = vdopt.optimize(model, compile=True)
    first, second = toy_inputs(), toy_inputs()
    with torch.no_grad():
        assert rel(opt(**first)["sample"], model(**first)["sample"]) <= 1e-5
        runner = opt.plans[0].program.gm
        assert isinstance(runner, CompiledGraph) and runner.compile_s > 0
        compile_s = runner.compile_s
        assert rel(opt(**second)["sample"], model(**second)["sample"]) <= 1e-5
    assert runner.compile_s == compile_s  # compiled once, reused
    assert "compiled: Inductor, first calls" in opt.report()
    kind, _, graphs = program_parts(opt.plans[0].program)
    assert kind == "graph" and graphs["main"] is runner.gm  # what save exports
