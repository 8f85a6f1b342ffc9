"""A rank that dies or hangs becomes an error on the others, never a hang.

Two real gloo ranks build a Ulysses plan; then rank 1 exits (or sleeps past the mesh
timeout) instead of running the call. Rank 0's call must raise within the mesh's
``timeout_s`` (plus slack), not block forever, and the error must say which call and graph
it was in and which mesh group and ranks it waited for, with gloo's error chained.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from multirank import _free_port

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


def _rank(rank: int, port: int, mode: str, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    import vdopt

    torch.manual_seed(0)
    model = TinyVideoDiT().eval()
    args, kwargs = (torch.randn(1, 4, 3, 8, 8),), {"timestep": torch.tensor([0.5])}
    opt = vdopt.optimize(model, vdopt.Mesh(ulysses=2, timeout_s=MESH_TIMEOUT_S), example_inputs=(args, kwargs))
    assert any(r.stats.get("all_to_all") == 4 for r in opt.plans[0].passes), "Ulysses did not rewrite the model"
    if rank == 1:
        if mode == "dies":
            os._exit(3)
        time.sleep(4 * MESH_TIMEOUT_S)  # hangs: never joins the collectives
        return
    start = time.perf_counter()
    try:
        opt(*args, **kwargs)
        queue.put(("no error", time.perf_counter() - start))
    except Exception as e:
        cause = e.__cause__
        queue.put((f"{type(e).__name__}: {e}", time.perf_counter() - start,
                   f"{type(cause).__name__}: {cause}" if cause is not None else None))


@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_a_lost_rank_is_an_error_on_the_others(mode):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, mode, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        message, seconds, cause = queue.get(timeout=120)
    finally:
        for p in procs:
            p.join(timeout=1)
            if p.is_alive():
                p.kill()
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
