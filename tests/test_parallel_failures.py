"""A rank that dies or hangs becomes an error on the others, never a hang.

Two real gloo ranks (``run_local_ranks``) build a Ulysses plan; then rank 1 exits (or waits
until rank 0 has given up) instead of running the call. Rank 0's call must raise within the mesh's
``timeout_s`` (plus slack), not block forever, and the error must say which call and graph
it was in and which mesh group and ranks it waited for, with gloo's error chained.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from vdopt.runtime.local_ranks import LocalRanksError, run_local_ranks

MESH_TIMEOUT_S = 3.0


class TinyVideoDiT(torch.nn.Module):
    """Patch embedding, one self-attention, a projection: enough for Ulysses (no diffusers import)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Conv3d(4, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.qkv = torch.nn.Linear(32, 96)
        self.out = torch.nn.Linear(32, 32)
        self.proj = torch.nn.Linear(32, 16)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)  # (B, T*H*W, C)
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C)
        return self.proj(x + self.out(attn) * timestep[:, None, None])


def _rank(rank: int, world_size: int, mode: str, done: str):
    """Rank 0: the call's error (message, seconds, cause). Rank 1: dies, or hangs until rank 0 is done."""
    import vdopt

    torch.manual_seed(0)
    model = TinyVideoDiT().eval()
    args, kwargs = (torch.randn(1, 4, 3, 8, 8),), {"timestep": torch.tensor([0.5])}
    opt = vdopt.optimize(model, vdopt.Mesh(ulysses=2, timeout_s=MESH_TIMEOUT_S), example_inputs=(args, kwargs))
    assert any(r.stats.get("all_to_all") == 4 for r in opt.plans[0].passes), "Ulysses did not rewrite the model"
    if rank == 1:
        if mode == "dies":
            os._exit(3)
        # hangs: never joins the collectives (until rank 0 has given up on them)
        give_up = time.monotonic() + 120
        while not os.path.exists(done) and time.monotonic() < give_up:
            time.sleep(0.1)
        return None
    start = time.perf_counter()
    try:
        opt(*args, **kwargs)
        return ("no error", time.perf_counter() - start, None)
    except Exception as e:
        cause = e.__cause__
        return (f"{type(e).__name__}: {e}", time.perf_counter() - start,
                f"{type(cause).__name__}: {cause}" if cause is not None else None)
    finally:
        open(done, "w").close()


@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_a_lost_rank_is_an_error_on_the_others(mode, tmp_path):
    done = str(tmp_path / "rank0-done")
    if mode == "dies":  # the launcher names the lost rank, and keeps rank 0's report
        with pytest.raises(LocalRanksError) as info:
            run_local_ranks(2, _rank, mode, done, backend="gloo", timeout=240, grace=120)
        assert set(info.value.failures) == {1}, str(info.value)
        assert info.value.failures[1].line.startswith("exited with code 3 without reporting")
        message, seconds, cause = info.value.results[0]
    else:
        (message, seconds, cause), _ = run_local_ranks(2, _rank, mode, done, backend="gloo", timeout=240)
    assert seconds < MESH_TIMEOUT_S + 5, f"rank 0 waited {seconds:.1f} s"
    # says where in vdopt and whom it waited for, then gloo's own words (also chained)
    assert message.startswith("CollectiveError: vdopt: a collective failed on rank 0 during call 1 of TinyVideoDiT"), message
    assert "in graph main, waiting on the ulysses group (ranks [0, 1]) of Mesh(" in message, message
    assert cause is not None and cause.split(": ", 1)[1] in message, (message, cause)
    if mode == "hangs":
        assert "Timed out" in cause or "timeout" in cause.lower(), cause


MESH_UNDER_TORCHRUN = """
import os, torch, torch.distributed as dist, vdopt
before = dist.is_initialized()
mesh = vdopt.Mesh(ulysses=2)
t = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
torch.save({{"before": before, "rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item()}},
           os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
dist.destroy_process_group()
"""


def test_mesh_sets_up_the_process_group_when_built(tmp_path):
    """Under torchrun, dist.get_rank() works right after vdopt.Mesh(...), before any call."""
    script = tmp_path / "mesh.py"
    script.write_text(MESH_UNDER_TORCHRUN.format(out=str(tmp_path)))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(script)], cwd=tmp_path, check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [g["rank"] for g in got] == [0, 1] and all(g["world"] == 2 and g["sum"] == 3.0 for g in got)
    assert not any(g["before"] for g in got)
