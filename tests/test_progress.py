"""Progress without a terminal: log lines instead of a bar nobody sees."""

from __future__ import annotations

import io
import logging
import sys

from vdopt.progress import LogProgress, progress


def test_without_a_terminal_progress_is_log_lines(monkeypatch, caplog):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # what CI and a log file look like
    caplog.set_level(logging.INFO, logger="vdopt.progress")
    with progress(3, "vdopt compile main", interval_s=0.0) as bar:
        assert isinstance(bar, LogProgress)
        bar.set_postfix_str("capture")
        bar.update(1)
        bar.set_postfix_str("passes")
        bar.update(2)
    lines = [r.getMessage() for r in caplog.records if r.name == "vdopt.progress"]
    assert lines[0] == "vdopt compile main: 0/3 started"
    assert lines[1].startswith("vdopt compile main: 1/3 after ") and lines[1].endswith("(capture)")
    assert lines[-1].startswith("vdopt compile main: 3/3 done in ")
    assert len(lines) == 3  # the last update is reported by the "done" line only


def test_log_lines_are_rate_limited(caplog):
    caplog.set_level(logging.INFO, logger="vdopt.progress")
    # An interval no test run reaches: only the start and the end are logged.
    with LogProgress(1000, "vdopt save Model", interval_s=1e9) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "vdopt.progress"]
    assert len(lines) == 2 and lines[-1].startswith("vdopt save Model: 1000/1000 done in ")


def test_stopped_work_says_so(caplog):
    caplog.set_level(logging.INFO, logger="vdopt.progress")
    try:
        with LogProgress(4, "vdopt compile main") as bar:
            bar.update(1)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert caplog.records[-1].getMessage().startswith("vdopt compile main: 1/4 stopped in ")


def test_on_a_terminal_progress_is_a_tqdm_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    from tqdm.auto import tqdm

    with progress(2, "vdopt compile main") as bar:
        assert isinstance(bar, tqdm)
        bar.update(2)
    assert "vdopt compile main" in sys.stderr.getvalue()


def test_disabled_progress_reports_nothing(caplog):
    caplog.set_level(logging.INFO, logger="vdopt.progress")
    with progress(2, "vdopt save Model", enabled=False) as bar:  # e.g. a rank other than 0
        bar.update(2)
    assert not [r for r in caplog.records if r.name == "vdopt.progress"]
