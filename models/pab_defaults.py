"""Default Pyramid Attention Broadcast settings per zoo model.

Ranges and timestep windows are those the PAB authors ship with VideoSys
(NUS-HPC-AI-Lab/VideoSys, ``videosys/pipelines/*/pipeline_*.py``, the ``*PABConfig``
classes), which are the settings of the PAB paper (arXiv 2408.12588). Wan is not in the
paper; its entry is the setting vdopt's baseline used for diffusers' hook on Wan2.1-1.3B
(spatial 2, cross 6, window (100, 800); see the project's ANCHORS.md).

VideoSys' MLP broadcast is a table of (timestep -> blocks) specific to each checkpoint's
sampler; vdopt's ``mlp_range`` is a plain range, so it is left off here (``None``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from vdopt.config import PABConfig

__all__ = ["PAB_DEFAULTS", "default_pab_config"]

PAB_DEFAULTS: Mapping[str, PABConfig] = MappingProxyType(
    {
        # OpenSoraPABConfig: PAB246 over (450, 930) for spatial, temporal and cross.
        "opensora": PABConfig(
            spatial_range=2, temporal_range=4, cross_range=6,
            spatial_window=(450, 930), temporal_window=(450, 930), cross_window=(450, 930),
        ),
        # LattePABConfig: spatial 2, temporal 3, cross 6 over (100, 800).
        "latte": PABConfig(
            spatial_range=2, temporal_range=3, cross_range=6,
            spatial_window=(100, 800), temporal_window=(100, 800), cross_window=(100, 800),
        ),
        # OpenSoraPlanV120PABConfig (3D full attention, no temporal blocks): spatial 2 and
        # cross 6 over (100, 850). The zoo's v1.3 model has the same attention layout.
        "opensora_plan": PABConfig(
            spatial_range=2, temporal_range=None, cross_range=6,
            spatial_window=(100, 850), cross_window=(100, 850),
        ),
        # CogVideoXPABConfig: joint text-video attention follows spatial: 2 over (100, 850).
        "cogvideox": PABConfig(
            spatial_range=2, temporal_range=None, cross_range=None, spatial_window=(100, 850),
        ),
        # Not in the paper: the setting of the diffusers-hook baseline on Wan2.1.
        "wan": PABConfig(
            spatial_range=2, temporal_range=None, cross_range=6,
            spatial_window=(100, 800), cross_window=(100, 800),
        ),
    }
)
"""Zoo model name -> its default ``PABConfig``."""


def default_pab_config(name: str) -> PABConfig:
    """The default ``PABConfig`` of zoo model ``name``."""
    try:
        return PAB_DEFAULTS[name]
    except KeyError:
        raise ValueError(f"no default PAB config for {name!r}; known: {', '.join(sorted(PAB_DEFAULTS))}") from None
