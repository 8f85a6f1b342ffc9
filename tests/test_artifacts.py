"""AOT artifacts and compiled execution.

Saved artifacts load in a fresh process without the model's code and match: eager outputs
(one rank; two gloo ranks with Ulysses, also under torchrun without init_process_group), the
output structure, and PAB's step behaviour. Every mismatch case fails with its own error (a
byte flipped in a file of the right size included). An interrupted save leaves nothing that
loads and an overwritten artifact intact, the next save cleans up after it, and a save or
load failing on one rank fails every rank at once. AOTInductor builds C++ on the CPU, so the
model is tiny and each artifact is compiled once per module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from multirank import run_on_ranks

import vdopt
from vdopt.artifacts import ArtifactError, program_parts, read_manifest, remove_leftovers
from vdopt.artifacts.staging import StagingDir
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = opt.save(tmp_path_factory.mktemp("artifacts") / "toy_pab")
    opt.reset()
    with torch.no_grad():
        expected = [opt(**c)["sample"] for c in calls]
        eager = [model(**c)["sample"] for c in calls]
    return {"path": path, "calls": calls, "expected": expected, "eager": eager,
            "summary": opt.plans[0].program.summary(), "save_warnings": [str(w.message) for w in caught
                                                                        if issubclass(w.category, FutureWarning)]}


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
    # Every file is recorded with its sha256.
    files = [manifest["weights"][0]] + [v["packages"][0] for v in plan["variants"].values()]
    assert len(files) == 3
    for record in files:
        assert hashlib.sha256((pab_artifact["path"] / record["path"]).read_bytes()).hexdigest() == record["sha256"]


def test_save_and_load_print_no_torch_future_warning(pab_artifact):
    # torch 2.13's Inductor warns "`isinstance(treespec, LeafSpec)` is deprecated" on every AOT
    # compile; vdopt filters exactly that message at its one call site.
    assert pab_artifact["save_warnings"] == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = vdopt.load(pab_artifact["path"])
        m(**pab_artifact["calls"][0])
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_load_in_fresh_process_matches_eager_outputs_and_pab_steps(pab_artifact, tmp_path):
    io = tmp_path / "io.pt"
    torch.save({"calls": pab_artifact["calls"]}, io)
    script = textwrap.dedent(f"""
        import sys, warnings, torch, vdopt
        warnings.simplefilter("error", FutureWarning)
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
    elif case in ("flipped byte in package", "flipped byte in weights"):
        record = manifest["plans"][0]["variants"]["reuse_spatial"]["packages"][0] if "package" in case else manifest["weights"][0]
        target = dst / record["path"]
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
        target.write_bytes(bytes(data))
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
    "flipped byte in package": r"artifact file plan0/reuse_spatial.rank0.pt2 in .* was modified after it was saved: its sha256",
    "flipped byte in weights": r"artifact file weights.rank0.pt in .* was modified after it was saved",
    "missing weights": "incomplete: weights.rank0.pt is missing",
    "other torch": "compiled with torch 2.0.0\\+cu118, this process runs torch",
    "other world size": r"artifact .*copy was saved for world size 2 \(Mesh\(.*ulysses=2.*\)\) but this process runs with world size 1",
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


def _kill_mid_save(target: Path) -> Path:
    """Start saving the toy model to ``target`` in another process and SIGKILL it mid-save."""
    proc = subprocess.Popen([sys.executable, "-c", SAVE_THEN_HANG.format(tests=str(TESTS_DIR), target=str(target))],
                            cwd=target.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        partial = []
        while not partial and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            partial = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.partial-")]
        assert partial, "the save never started writing"
        proc.send_signal(signal.SIGKILL)  # mid-save: the packages are being compiled
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return partial[0]


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_interrupted_save_leaves_nothing_loadable(tmp_path):
    target = tmp_path / "toy"
    partial = _kill_mid_save(target)
    assert not target.exists()
    with pytest.raises(ArtifactError, match="no artifact at"):
        vdopt.load(target)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        vdopt.load(partial)


def test_killed_overwrite_keeps_the_old_artifact_and_the_next_save_cleans_up(pab_artifact, tmp_path):
    target = tmp_path / "toy"
    shutil.copytree(pab_artifact["path"], target)
    old = _tree_digest(target)
    partial = _kill_mid_save(target)
    assert partial.is_dir() and _tree_digest(target) == old  # the old artifact is untouched and still loads
    call = pab_artifact["calls"][0]
    assert rel(vdopt.load(target)(**call)["sample"], pab_artifact["eager"][0]) <= 1e-5

    # The next save to the same target removes the killed save's leftover and replaces the artifact.
    model, args, kwargs = toy_factory()
    opt = vdopt.optimize(model, example_inputs=(args, kwargs), compile=False)
    assert opt.save(target) == target
    assert not partial.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]
    assert read_manifest(target)["plans"][0]["program"] == "graph"  # the new artifact, not the PAB one
    with torch.no_grad():
        assert rel(vdopt.load(target)(*args, **kwargs)[0], model(*args, **kwargs)[0]) <= 1e-5


def test_leftover_cleanup_keeps_a_save_in_progress(tmp_path):
    target = tmp_path / "art"
    dead = tmp_path / ".art.partial-deadbeef"
    (dead / "plan0").mkdir(parents=True)
    (dead / "plan0" / "main.rank0.pt2").write_bytes(os.urandom(64))
    (tmp_path / ".other.partial-12345678").mkdir()  # another target's: not ours to delete
    live = StagingDir(target)  # holds its lock like a running save
    try:
        assert live.path.is_dir() and not dead.exists()  # creating it cleaned up the dead one
        dead.mkdir()
        assert remove_leftovers(target) == [dead]
        assert live.path.is_dir()
    finally:
        live.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-12345678"]


def _break_export(opt) -> None:
    """Make this process's save fail for real: a graph input without meta['val'] cannot be exported."""
    gm = opt.plans[0].program.gm
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    del placeholder.meta["val"]


def test_failed_save_over_an_artifact_leaves_it_unchanged(pab_artifact, tmp_path):
    target = tmp_path / "toy"
    shutil.copytree(pab_artifact["path"], target)
    old = _tree_digest(target)
    opt = vdopt.optimize(toy_model(), compile=False)
    opt(**toy_inputs())
    _break_export(opt)
    with pytest.raises(ArtifactError, match="has no meta\\['val'\\]: cannot export it"):
        opt.save(target)
    assert _tree_digest(target) == old
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]


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


@pytest.fixture(scope="module")
def ulysses_artifact(tmp_path_factory):
    inputs = toy_inputs(500.0)
    path = str(tmp_path_factory.mktemp("artifacts") / "toy_ulysses")
    saved = run_on_ranks(2, _save_ulysses, path, inputs, timeout=600)
    return {"path": path, "inputs": inputs, "saved": saved}


def _load_ulysses(rank: int, world: int, path: str, inputs: dict):
    m = vdopt.load(path)  # a fresh process: builds the mesh's groups, checks their names
    out = m(**inputs)["sample"]
    with pytest.raises(ArtifactError, match=r"saved for Mesh\(.*ulysses=2.*\) but vdopt.load got Mesh\(cfg=2"):
        vdopt.load(path, vdopt.Mesh(cfg=2))
    return out, read_manifest(path)["process_groups"][rank]


def test_two_rank_ulysses_artifact_matches_eager(ulysses_artifact):
    path, inputs = ulysses_artifact["path"], ulysses_artifact["inputs"]
    manifest = read_manifest(path)
    assert manifest["mesh"]["degrees"]["ulysses"] == 2 and manifest["mesh"]["world_size"] == 2
    assert sorted(p.name for p in Path(path).rglob("*.pt2")) == ["main.rank0.pt2", "main.rank1.pt2"]
    loaded = run_on_ranks(2, _load_ulysses, path, inputs, timeout=300)
    for (out, eager), (got, groups) in zip(ulysses_artifact["saved"], loaded):
        assert rel(out, eager) <= 1e-5
        assert rel(got, eager) <= 1e-5
        assert groups and all(ranks == [0, 1] for ranks in groups.values())  # the ulysses group


TORCHRUN_LOAD = """
import os, torch, torch.distributed as dist, vdopt
from vdopt.artifacts import ArtifactError
rank = int(os.environ["RANK"])
got = {{"initialized": dist.is_initialized()}}
try:
    vdopt.load({one_rank!r})  # a 1-rank artifact under 2 ranks
except ArtifactError as e:
    got["one_rank_error"] = str(e)
m = vdopt.load({two_ranks!r})  # no init_process_group: load starts it from torchrun's environment
got["world"] = dist.get_world_size()
got["sample"] = m(**torch.load({inputs!r}))["sample"]
torch.save(got, os.path.join({out!r}, f"rank{{rank}}.pt"))
dist.destroy_process_group()
"""


def test_torchrun_load_without_init_process_group(pab_artifact, ulysses_artifact, tmp_path):
    torch.save(ulysses_artifact["inputs"], tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(TORCHRUN_LOAD.format(one_rank=str(pab_artifact["path"]), two_ranks=ulysses_artifact["path"],
                                           inputs=str(tmp_path / "inputs.pt"), out=str(tmp_path)))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(script)], cwd=tmp_path, check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for rank, (_, eager) in enumerate(ulysses_artifact["saved"]):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["initialized"] is False and got["world"] == 2
        assert rel(got["sample"], eager) <= 1e-5
        error = got["one_rank_error"]
        assert str(pab_artifact["path"]) in error
        assert "saved for world size 1" in error and "runs with world size 2 (torchrun's WORLD_SIZE)" in error


def _load_with_one_bad_rank(rank: int, world: int, path: str):
    start = time.monotonic()
    try:
        vdopt.load(path)
    except ArtifactError as e:
        return str(e), time.monotonic() - start
    return None, time.monotonic() - start


def test_modified_file_on_one_rank_fails_every_rank(ulysses_artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ulysses_artifact["path"], copy)
    package = copy / "plan0" / "main.rank1.pt2"
    data = bytearray(package.read_bytes())
    data[100] ^= 0xFF
    package.write_bytes(bytes(data))
    (error0, _), (error1, _) = run_on_ranks(2, _load_with_one_bad_rank, str(copy), timeout=300, pg_timeout=300)
    assert "plan0/main.rank1.pt2" in error1 and "was modified after it was saved" in error1
    assert error0 is not None and "rank(s) 1 failed" in error0 and "main.rank1.pt2" in error0


def _save_failing_on_rank1(rank: int, world: int, path: str, inputs: dict):
    opt = vdopt.optimize(toy_model(), vdopt.Mesh(ulysses=2), compile=False)
    opt(**inputs)
    if rank == 1:
        _break_export(opt)
    start = time.monotonic()
    try:
        opt.save(path)
    except ArtifactError as e:
        return str(e), time.monotonic() - start
    return None, time.monotonic() - start


def test_save_failing_on_one_rank_fails_every_rank_promptly(pab_artifact, tmp_path):
    target = tmp_path / "toy"
    shutil.copytree(pab_artifact["path"], target)  # an artifact the failed save must leave as it was
    old = _tree_digest(target)
    pg_timeout = 300.0
    (error0, seconds0), (error1, seconds1) = run_on_ranks(
        2, _save_failing_on_rank1, str(target), toy_inputs(500.0), timeout=400, pg_timeout=pg_timeout)
    assert "has no meta['val']" in error1  # rank 1's own error
    assert f"saving {target} failed while writing on rank(s) 1" in error0 and "has no meta['val']" in error0
    # Rank 0 learns of it from the exchange after its own write, not from a collective timing out.
    assert max(seconds0, seconds1) < pg_timeout / 2
    assert _tree_digest(target) == old
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]


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
