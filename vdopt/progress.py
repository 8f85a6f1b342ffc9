"""Progress of long work (capture, passes, Inductor and AOTInductor compiles): one reporter.

``progress(total, desc)`` gives a tqdm bar when stderr is a terminal and, otherwise (logs,
CI, a pipe), a reporter that writes INFO lines to the ``vdopt.progress`` logger, e.g.
``vdopt compile main: 0/1 started`` ... ``vdopt compile main: 1/1 done in 23.4 s``. A bar
that draws nothing in a log would leave a 15-40 s compile looking like a hang; lines are
rate-limited so that a fast loop does not flood the log. Ranks other than 0 report nothing:
every rank does the same work, one report is enough.

Both kinds have the subset of tqdm's interface vdopt uses: a context manager with
``update(n=1)``, ``set_postfix_str(text)`` and ``close()``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Protocol

log = logging.getLogger("vdopt.progress")

LOG_INTERVAL_S = 5.0
"""At most one line per this many seconds while work advances (start and end always print)."""


class Progress(Protocol):
    """What vdopt calls on a progress reporter (a subset of tqdm's interface)."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...

    def close(self) -> Any: ...

    def __enter__(self) -> "Progress": ...

    def __exit__(self, *exc: Any) -> Any: ...


class LogProgress:
    """Progress as rate-limited INFO log lines (no terminal to draw a bar on)."""

    def __init__(self, total: int, desc: str, *, interval_s: float = LOG_INTERVAL_S, enabled: bool = True) -> None:
        self.total = total
        self.desc = desc
        self.n = 0
        self.postfix = ""
        self.interval_s = interval_s
        self.enabled = enabled
        self._start = time.monotonic()
        self._last_line = self._start
        self._closed = False
        self._line("started")

    def _line(self, state: str) -> None:
        if not self.enabled:
            return
        step = f" ({self.postfix})" if self.postfix and not self._closed else ""
        log.info("%s: %d/%d %s%s", self.desc, self.n, self.total, state, step)
        self._last_line = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.n < self.total and now - self._last_line >= self.interval_s:
            self._line(f"after {now - self._start:.1f} s")

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        # Only stored: it shows on the next line, so naming a stage never adds a line of its own.
        self.postfix = s

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        state = "done" if self.n >= self.total else "stopped"
        self._line(f"{state} in {time.monotonic() - self._start:.1f} s")

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _is_quiet_rank() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def progress(total: int, desc: str, *, enabled: bool | None = None, interval_s: float = LOG_INTERVAL_S) -> Progress:
    """A progress reporter for ``total`` steps: a tqdm bar on a terminal, else log lines.

    ``desc`` names the work (``"vdopt compile main"``). ``enabled=None`` reports on rank 0
    of the default process group only (or when there is none); ``False`` reports nothing
    (a caller that knows its rank otherwise), ``True`` always reports.
    """
    quiet = _is_quiet_rank() if enabled is None else not enabled
    if not quiet and _can_draw_a_bar():
        from tqdm.auto import tqdm  # a notebook widget under Jupyter, a text bar on a terminal

        return tqdm(total=total, desc=desc, leave=False)
    return LogProgress(total, desc, interval_s=interval_s, enabled=not quiet)


def _can_draw_a_bar() -> bool:
    """stderr is a terminal, or a Jupyter kernel's stream (not a tty, but it shows widgets)."""
    stream = sys.stderr
    if stream is None:
        return False
    if type(stream).__module__.startswith("ipykernel"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
