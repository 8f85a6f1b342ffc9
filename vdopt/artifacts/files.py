"""The files of an artifact: content hashes for the manifest, verification, durable writes.

The manifest records each file's size and sha256. Loading checks both, so a truncated, a
modified or a swapped file is refused by name before anything reads it. Everything saving
writes is fsynced (files and directories) before the artifact is renamed into place, so after
a crash the artifact at the target is either the old one or the complete new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from vdopt.artifacts.errors import ArtifactError

_BLOCK = 1 << 24  # hashlib releases the GIL on large updates: other ranks' threads keep running


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(root: Path, path: Path) -> dict[str, Any]:
    """The manifest's entry for ``path`` (relative to the artifact ``root``): path, bytes, sha256."""
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_of(path)}


def verify_file(root: Path, record: Mapping[str, Any], *, check_hash: bool = True) -> Path:
    """The file of a manifest entry, after checking it exists and has the saved size and sha256."""
    path = root / record["path"]
    if not path.is_file():
        raise ArtifactError(
            f"artifact {root} is incomplete: {record['path']} is missing; copy the whole directory "
            "or save it again"
        )
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ArtifactError(
            f"artifact file {record['path']} in {root} has {size} bytes but {record['bytes']} were saved "
            "(truncated or modified); copy it again or save it again"
        )
    if check_hash:
        digest = sha256_of(path)
        if digest != record["sha256"]:
            raise ArtifactError(
                f"artifact file {record['path']} in {root} was modified after it was saved: its sha256 is "
                f"{digest[:16]}..., the manifest says {record['sha256'][:16]}...; copy it again from the "
                "original artifact or save the artifact again"
            )
    return path


def fsync_file(path: Path) -> None:
    """Flush a file another writer (torch.save, AOTInductor) closed to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and platforms) cannot fsync a directory; the data is synced
        pass
    finally:
        os.close(fd)


def write_json_durably(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
