"""The end-to-end benchmark's parent side: start one worker per method, warm up, time.

Every method runs in its own process (``e2e_worker``; a torchrun group for a mesh): clean
memory figures and no compile state shared between methods. Methods warm up one at a time,
then their timed generations go round by round (``harness.timing_rounds``) on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness
from e2e_worker import post
from e2e_workload import BenchConfig

log = logging.getLogger("vdopt.benchmarks.e2e")

ENTRY = Path(__file__).resolve().parent / "e2e.py"
"""The script a worker process runs (``e2e.py --worker METHOD ...``)."""


class Worker:
    """A method's worker process (or torchrun group of processes), driven by command files."""

    def __init__(self, method: str, cfg: BenchConfig, scratch: Path, *, ranks: int = 1,
                 extra: dict | None = None, timeout: float = 3600) -> None:
        self.method = method
        self.dir = scratch / method
        self.dir.mkdir(parents=True)
        self.timeout = timeout
        self.commands = 0
        per_rank = cfg if ranks == 1 or not cfg.threads else dataclasses.replace(cfg, threads=max(1, cfg.threads // ranks))
        argv = ["--worker", method, "--worker-config", json.dumps(dataclasses.asdict(per_rank)),
                "--worker-out", str(self.dir), "--worker-extra", json.dumps(extra or {}),
                "--spawn-time", repr(time.time())]
        self.proc = _launch(argv, ranks, per_rank.threads, self.dir / "log.txt")

    def command(self, command: str) -> dict[str, Any]:
        """Send ``command``; its answer once rank 0 has written it."""
        n = self.commands
        self.commands += 1
        post(self.dir / f"cmd{n}", command)
        deadline = time.monotonic() + self.timeout
        done = self.dir / f"done{n}"
        while not done.exists():
            if self.proc.poll() is not None and not done.exists():
                raise RuntimeError(f"{self.method} exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.method}: no answer to {command!r} in {self.timeout:.0f} s")
            time.sleep(0.02)
        return json.loads(done.read_text())

    def stop(self) -> dict[str, Any]:
        self.command("stop")
        self.proc.wait(timeout=120)
        return json.loads((self.dir / "result.json").read_text())

    def kill(self) -> None:
        """Kill the worker and, under torchrun, every rank it started (its own session)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def log_tail(self) -> str:
        """The last Python traceback in the worker's log (torchrun prints its own summary
        after it, which names no cause), else the log's last lines; the cause comes last."""
        path = self.dir / "log.txt"
        lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
        if starts:
            tb = lines[starts[-1]:]
            end = next((i for i, line in enumerate(tb) if i and line and not line[0].isspace()), len(tb) - 1)
            return "\n".join(tb[: end + 1][-30:])
        return "\n".join(lines[-12:]) or "no output"


def _die_with_parent() -> None:
    """In the child before ``exec``: SIGTERM when the driver dies, even by SIGKILL (a timeout).

    Workers run in their own session (so ``kill`` reaches every rank), which also keeps them
    alive after the driver; torchrun answers SIGTERM by stopping its ranks. Linux only."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _launch(argv: list[str], ranks: int, threads: int, log_path: Path) -> subprocess.Popen:
    """``e2e.py argv`` in its own session (torchrun with ``ranks`` > 1), output to ``log_path``."""
    script = str(ENTRY)
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", script, *argv]
    else:
        cmd = [sys.executable, script, *argv]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "w") as log_file:
        return subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)


def _run_one_shot(argv: list[str], threads: int, log_path: Path, timeout: float) -> tuple[bool, str]:
    """Run ``e2e.py argv`` to its end: ``(succeeded, the log's last lines)``."""
    proc = _launch(argv, 1, threads, log_path)
    try:
        ok = proc.wait(timeout=timeout) == 0
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        ok = False
    lines = log_path.read_text(errors="replace").strip().splitlines()
    return ok, "\n".join(lines[-12:])


def run_all(plan, cfg: BenchConfig, scratch: Path, timeout: float, interleave: bool) -> dict[str, dict[str, Any]]:
    """Warm every method up one at a time, then time ``cfg.repeats`` generations each.

    Interleaved (the CPU default), every worker stays up and the timed generations go round
    by round (each method once per round), so load from other processes on a shared
    machine hits every method alike; otherwise (CUDA) one method runs at a time.
    """
    results: dict[str, dict[str, Any]] = {}
    live: dict[str, Worker] = {}

    def fail(name: str, error: Exception) -> None:
        log.warning("%s failed: %s", name, error)
        results[name] = {"method": name, "skipped": f"failed: {str(error).strip().splitlines()[-1]}"}
        if name in live:
            live.pop(name).kill()

    def start(name: str, ranks: int, extra: dict[str, Any]):
        def warm() -> float:
            log.info("warming up %s%s", name, f" on {ranks} ranks" if ranks > 1 else "")
            live[name] = Worker(name, cfg, scratch, ranks=ranks, extra=extra, timeout=timeout)
            seconds = live[name].command("warmup")["seconds"]
            log.info("%-22s warm-up generation %.1f s", name, seconds)
            return seconds

        return warm

    def timed_generation(name: str):
        return lambda: live[name].command("run")["seconds"]

    try:
        warm = {name: start(name, ranks, extra) for name, ranks, extra in plan}
        if interleave:
            harness.warm_up(warm, on_error=fail)
            harness.timing_rounds({name: timed_generation(name) for name in list(live)}, repeats=cfg.repeats,
                                  on_error=fail, on_time=lambda r, n, t: log.info("round %d %-22s %8.2f s", r, n, t))
        else:  # one method at a time: only one worker holds the GPU
            for name in warm:
                if harness.warm_up({name: warm[name]}, on_error=fail):
                    harness.timing_rounds({name: timed_generation(name)}, repeats=cfg.repeats, on_error=fail)
                    if name in live:
                        _finish(name, live, results, cfg)
        for name in list(live):
            _finish(name, live, results, cfg)
    finally:
        for w in live.values():
            w.kill()
    return results


def _finish(name: str, live: dict[str, "Worker"], results: dict[str, dict[str, Any]], cfg: BenchConfig) -> None:
    """Stop ``name``'s worker and collect its result (a failure becomes a skipped row)."""
    w = live.pop(name)
    try:
        results[name] = w.stop()
        log.info("%-22s %8.2f s per generation (best of %d)", name, results[name]["seconds"], cfg.repeats)
    except Exception as e:  # noqa: BLE001  a failed method is a row, not the end of the run
        w.kill()
        results[name] = {"method": name, "skipped": f"failed: {str(e).strip().splitlines()[-1]}"}


def save_artifact(method: str, cfg: BenchConfig, scratch: Path, timeout: float) -> dict[str, Any]:
    """Compile ``method`` ahead of time (a one-shot worker); what ``save_worker`` reports."""
    if method.endswith("triton") and not cfg.device.startswith("cuda"):
        return {"skipped": "skipped: no GPU"}
    path = scratch / "artifact"
    out = scratch / "save_artifact.json"
    argv = ["--worker", "save_artifact", "--worker-config", json.dumps(dataclasses.asdict(cfg)),
            "--worker-out", str(out), "--worker-extra", json.dumps({"method": method, "artifact": str(path)})]
    log.info("compiling %s ahead of time (opt.save)", method)
    ok, tail = _run_one_shot(argv, cfg.threads, scratch / "save_artifact.log", timeout)
    if not ok:
        log.warning("saving the artifact failed:\n%s", tail)
        return {"skipped": f"failed: {tail.splitlines()[-1] if tail else 'no output'}"}
    return {**json.loads(out.read_text()), "path": str(path)}
