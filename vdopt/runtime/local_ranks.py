"""Run a function on ``N`` local ranks, one spawned process each, as torchrun would; collect
the results in rank order, or one error that says which ranks failed and how.

Each rank gets torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT`` on a free localhost port), initializes the default process
group (gloo on the CPU, NCCL when there is a GPU per rank), calls ``fn(rank, world_size,
*args)`` and sends back its return value. A rank that raises, dies without a word (a crash in
native code, ``os._exit``) or does not finish in time becomes a ``LocalRanksError`` naming
the ranks; ranks that failed alike are named together, once. The caller never hangs: ranks
still running when the others have failed get ``grace`` seconds to report, then they are
killed, as are ranks past ``timeout``.

Used by ``vdopt demo``, ``vdopt calibrate``, the benchmarks and the multi-rank tests.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

MAX_LINE = 500
"""Characters of a failure's one-line summary (the traceback has the rest)."""


def free_port() -> int:
    """A free TCP port on localhost (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(world_size: int) -> str:
    """NCCL when there is a GPU for every rank, else gloo."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"


@dataclasses.dataclass(frozen=True)
class RankFailure:
    """How one rank failed."""

    line: str
    """One line: the exception (or ``describe``'s wording of it), or how the rank was lost."""
    traceback: str = ""
    """The rank's traceback; empty for a rank that never reported."""


class LocalRanksError(RuntimeError):
    """Some ranks of ``run_local_ranks`` failed; the message names them, then the tracebacks.

    Failures are listed in the order they reached the parent: the first is usually the cause,
    the others ranks that lost it as a peer. ``failures`` (rank -> ``RankFailure``) and
    ``results`` (rank -> return value, for the ranks that finished) stay on the error for a
    caller that wants either.
    """

    def __init__(self, world_size: int, failures: dict[int, RankFailure], results: dict[int, Any]) -> None:
        self.world_size = world_size
        self.failures = dict(failures)
        self.results = results
        tracebacks = self.tracebacks()
        super().__init__(self.summary() + (f"\n\n{tracebacks}" if tracebacks else ""))

    def _by_line(self) -> dict[str, list[int]]:
        by_line: dict[str, list[int]] = {}
        for rank, failure in self.failures.items():
            by_line.setdefault(failure.line, []).append(rank)
        return by_line

    def summary(self) -> str:
        """One clause per distinct failure, naming its ranks: ``every rank: ...; rank 1: ...``."""
        parts = []
        for line, ranks in self._by_line().items():
            if len(ranks) == self.world_size > 1:
                who = "every rank"
            else:
                who = ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, sorted(ranks)))
            parts.append(f"{who}: {line}")
        return "; ".join(parts)

    def tracebacks(self) -> str:
        """The traceback of the first rank of each distinct failure that has one."""
        blocks = []
        for ranks in self._by_line().values():
            failure = self.failures[ranks[0]]
            if failure.traceback:
                blocks.append(f"traceback of rank {ranks[0]}:\n{failure.traceback.rstrip()}")
        return "\n\n".join(blocks)


def one_line(error: BaseException) -> str:
    """``Type: message`` on one line, cut at ``MAX_LINE`` characters."""
    text = " ".join(str(error).split())
    line = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return line if len(line) <= MAX_LINE else line[:MAX_LINE] + " ..."


@dataclasses.dataclass(frozen=True)
class _RankSetup:
    world_size: int
    port: int
    backend: str | None
    threads: int | None
    pg_timeout: float
    env: dict[str, str]
    describe: Callable[[BaseException], str] | None


def _rank_main(rank: int, setup: _RankSetup, fn: Callable, args: tuple, conn) -> None:
    import torch.distributed as dist

    world = setup.world_size
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(setup.port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), **setup.env)
    if setup.threads is not None:
        torch.set_num_threads(setup.threads)
    try:
        if setup.backend is not None:
            if setup.backend == "nccl":
                torch.cuda.set_device(rank)
            dist.init_process_group(setup.backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=setup.pg_timeout))
        # Plain pickle, not multiprocessing's: a tensor would otherwise travel as a
        # shared-memory handle that dies with this process.
        report = pickle.dumps((True, fn(rank, world, *args)))
    except BaseException as error:  # noqa: BLE001  every failure goes to the parent, assertions included
        try:
            line = (setup.describe or one_line)(error)
        except Exception:  # noqa: BLE001  a broken describe must not lose the report
            line = one_line(error)
        report = pickle.dumps((False, line, traceback.format_exc()))
    try:
        # Sent (synchronously, no feeder thread) before the group is torn down: destroying a
        # group whose peer failed can block, and a report still queued would be lost.
        conn.send_bytes(report)
        conn.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _lost(exitcode: int | None) -> str:
    if exitcode is None:
        return "closed its channel to the parent without reporting"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name} without reporting (a crash in native code, or out of memory?)"
    return f"exited with code {exitcode} without reporting (a crash in native code, or os._exit?)"


def _collect(procs: list, readers: dict, results: dict[int, Any], failures: dict[int, RankFailure],
             timeout: float, grace: float) -> None:
    """Read every rank's report until all are in, ``timeout`` passes, or ``grace`` after the first failure."""
    deadline = time.monotonic() + timeout
    stop_at = None
    first_failed = None
    waiting = dict(readers)  # connection -> rank
    while waiting:
        now = time.monotonic()
        if now >= deadline or (stop_at is not None and now >= stop_at):
            break
        limit = min(deadline, stop_at if stop_at is not None else deadline) - now
        for conn in multiprocessing.connection.wait(list(waiting), timeout=min(limit, 1.0)):
            rank = waiting.pop(conn)
            try:
                report = pickle.loads(conn.recv_bytes())
            except EOFError:  # its end closed without a report: the process is gone
                procs[rank].join(timeout=1)
                failures[rank] = RankFailure(_lost(procs[rank].exitcode))
            except Exception as error:  # noqa: BLE001  an unreadable result is that rank's failure
                failures[rank] = RankFailure(f"its result could not be read back: {one_line(error)}",
                                             traceback.format_exc())
            else:
                if report[0]:
                    results[rank] = report[1]
                else:
                    failures[rank] = RankFailure(report[1], report[2])
            finally:
                conn.close()
            if rank in failures and stop_at is None:
                first_failed = rank
                stop_at = time.monotonic() + grace
    for rank in sorted(waiting.values()):
        if stop_at is not None and time.monotonic() >= stop_at:
            failures[rank] = RankFailure(f"no report {grace:g} s after rank {first_failed} failed (waiting for it in "
                                         f"a collective?); stopped")
        else:
            failures[rank] = RankFailure(f"did not finish within {timeout:g} s; stopped (raise timeout= if the "
                                         f"work needs longer)")
    for conn in waiting:
        conn.close()


def _stop(procs: list, patience: float) -> None:
    """Join every process within ``patience`` seconds in all; kill the rest."""
    end = time.monotonic() + patience
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.kill()
            p.join()


def run_local_ranks(world_size: int, fn: Callable[..., Any], *args: Any, backend: str | None = None,
                    group: bool = True, threads_per_rank: int | None = 1, timeout: float = 600.0,
                    pg_timeout: float = 120.0, grace: float = 5.0, env: dict[str, str] | None = None,
                    describe: Callable[[BaseException], str] | None = None) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each rank in its own
    spawned process with the default process group initialized; raises ``LocalRanksError``.

    ``fn``, ``args`` and ``describe`` must pickle (module-level functions); results come back
    by value (plain pickle), so keep them on the CPU.

    * ``backend``: the process group's; default NCCL with a GPU per rank (rank ``r`` on
      ``cuda:r``), else gloo. ``group=False``: no process group at all (a fresh process per
      rank, e.g. for a fake group ``fn`` sets up itself, or a clean memory measurement).
    * ``threads_per_rank``: torch threads in each rank (1: ranks share the cores without
      oversubscribing them; ``None`` keeps torch's default).
    * ``timeout``: seconds for the whole run; ranks not done by then are killed.
    * ``pg_timeout``: the process group's timeout (a collective waiting on a lost peer).
    * ``grace``: after the first failure, seconds the other ranks get to report (their own
      error is often the same, or says what they waited for) before they are killed.
    * ``env``: extra environment variables set in each rank before the group is initialized.
    * ``describe``: runs in the failing rank: the one-line wording of its exception
      (default ``Type: message``).
    """
    if world_size < 1:
        raise ValueError(f"run_local_ranks needs at least 1 rank, got world_size={world_size}")
    if group and backend is None:
        backend = default_backend(world_size)
    setup = _RankSetup(world_size=world_size, port=free_port(), backend=backend if group else None,
                       threads=threads_per_rank, pg_timeout=pg_timeout, env=dict(env or {}), describe=describe)
    ctx = multiprocessing.get_context("spawn")
    procs, readers = [], {}
    results: dict[int, Any] = {}
    failures: dict[int, RankFailure] = {}
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            readers[reader] = rank
            proc = ctx.Process(target=_rank_main, args=(rank, setup, fn, args, writer), daemon=True,
                               name=f"vdopt-rank-{rank}")
            procs.append(proc)
            proc.start()
            writer.close()  # the rank holds the only write end: its exit is an EOF here
        _collect(procs, readers, results, failures, timeout, grace)
    finally:
        for reader in readers:
            reader.close()
        # Ranks that reported are tearing down their group: a few seconds, unless a peer failed.
        _stop(procs, 5.0 if not failures and len(results) == world_size else 0.5)
    if failures:
        raise LocalRanksError(world_size, failures, results)
    return [results[rank] for rank in range(world_size)]
