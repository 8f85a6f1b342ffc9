"""Writing an artifact directory atomically: a hidden staging directory renamed into place.

A save writes everything into ``.{name}.partial-{id}`` next to the target, fsyncs it, then
swaps it with the target in one ``renameat2(RENAME_EXCHANGE)`` (Linux): the old artifact stays
complete and loadable until the new one is, and is deleted only after the swap. Where the
exchange is unavailable (other platforms, some network filesystems) the old artifact is first
renamed aside to ``.{name}.old-{id}``, leaving a moment with nothing at the target.

A killed save leaves its staging directory behind. The next save to the same target deletes
such leftovers, but never one that a running save is still writing: each save holds an
exclusive ``flock`` on its staging directory for as long as it runs (the kernel drops it when
the process dies), and creating a staging directory and cleaning up leftovers happen under a
short ``flock`` on the parent directory, so a new directory is never seen unlocked.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from vdopt.artifacts.errors import ArtifactError
from vdopt.artifacts.files import fsync_dir

try:
    import fcntl
except ImportError:  # not a POSIX system: saves cannot tell live staging directories from leftovers
    fcntl = None

log = logging.getLogger(__name__)

PARTIAL = ".partial-"
"""Infix of staging directories: ``.{name}.partial-{id}``."""
OLD = ".old-"
"""Infix of an old artifact renamed aside when the atomic exchange is unavailable."""
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def check_target(path: Path, manifest_name: str) -> None:
    """Refuse to replace anything but an artifact (a directory with a manifest) or an empty directory."""
    if path.exists() and not (path.is_dir() and ((path / manifest_name).is_file() or not any(path.iterdir()))):
        raise ArtifactError(f"{path} exists and is not a vdopt artifact: choose another path or remove it")


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _try_lock(fd: int) -> bool | None:
    """True if locked now, False if another save holds it, None where locks are unsupported."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # e.g. ENOLCK on a filesystem without locks: saves still work, cleanup is skipped
        return None
    return True


@contextlib.contextmanager
def _parent_locked(parent: Path) -> Iterator[None]:
    """Held only while creating a staging directory or removing leftovers (milliseconds)."""
    fd = _open_dir(parent)
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):  # no locks on this filesystem: leftovers are then kept
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_leftovers(target: Path) -> list[Path]:
    """Delete what killed saves to ``target`` left next to it; returns what was deleted.

    Staging directories whose save is still running (locked) are kept. An old artifact renamed
    aside is deleted only once a complete artifact is back at ``target``.
    """
    removed = []
    prefix = f".{target.name}."
    for entry in sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix)):
        rest = entry.name[len(prefix) - 1:]
        if not entry.is_dir() or entry.is_symlink():
            continue
        if rest.startswith(PARTIAL):
            fd = _open_dir(entry)
            try:
                if _try_lock(fd) is not True:
                    log.debug("keeping %s: a save may be writing it", entry)
                    continue
                shutil.rmtree(entry)
            finally:
                os.close(fd)
        elif rest.startswith(OLD):
            if not target.is_dir():
                log.warning("%s holds the artifact a save was replacing when it was interrupted; %s is missing",
                            entry, target)
                continue
            shutil.rmtree(entry)
        else:
            continue
        log.info("removed %s, left by an interrupted save", entry)
        removed.append(entry)
    return removed


class StagingDir:
    """The hidden directory a save writes into, locked while it lives; becomes the target on ``commit``."""

    def __init__(self, target: Path) -> None:
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        with _parent_locked(target.parent):
            remove_leftovers(target)
            self.path = target.with_name(f".{target.name}{PARTIAL}{uuid.uuid4().hex[:8]}")
            self.path.mkdir()
            self._fd: int | None = _open_dir(self.path)
            _try_lock(self._fd)  # a fresh directory: nobody else can hold it

    def commit(self) -> None:
        """Make the staged files durable, then put them at the target in one step."""
        for directory in sorted(p for p in self.path.rglob("*") if p.is_dir()):
            fsync_dir(directory)
        fsync_dir(self.path)
        if not _exchange(self.path, self.target):
            self._replace_in_two_steps()
        fsync_dir(self.target.parent)
        # self.path now holds the old artifact (or nothing); close() deletes it.

    def _replace_in_two_steps(self) -> None:
        old = self.target.with_name(f".{self.target.name}{OLD}{uuid.uuid4().hex[:8]}")
        os.rename(self.target, old)
        os.rename(self.path, self.target)
        fsync_dir(self.target.parent)
        shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        """Delete what is left at the staging path (a failed save's files, or the replaced artifact)."""
        if self._fd is None:
            return
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            os.close(self._fd)
            self._fd = None


def _exchange(staged: Path, target: Path) -> bool:
    """Put ``staged`` at ``target`` atomically; the old ``target`` (if any) ends up at ``staged``.

    Returns False where that takes two renames (see ``StagingDir._replace_in_two_steps``).
    """
    if not target.exists():
        try:
            os.rename(staged, target)  # atomic; also replaces an empty directory
            return True
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # a concurrent save got there first: replace its artifact like any other
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(staged), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # filesystem or kernel without exchange
        return False
    raise OSError(err, f"cannot swap {staged} into {target}: {os.strerror(err)}")


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
