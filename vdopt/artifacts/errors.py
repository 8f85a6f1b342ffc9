"""The one error type of artifacts: what is wrong and what to do about it."""

from __future__ import annotations


class ArtifactError(ValueError):
    """An artifact is missing, incomplete, modified, or does not fit this process, mesh or call."""
