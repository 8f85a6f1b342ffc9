"""vdopt: a graph-rewriting inference compiler for video diffusion transformers."""

from vdopt.api import inspect, optimize, report
from vdopt.artifacts import ArtifactError, load
from vdopt.capture import CaptureError
from vdopt.config import PABConfig, PipeFusionConfig
from vdopt.mesh import Mesh
from vdopt.passes.analysis.sites import AttentionSite, VideoLayout
from vdopt.passes.runner import PassError
from vdopt.planning import Plan, plan
from vdopt.vae import PatchParallelVAE, optimize_vae

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "AttentionSite",
    "CaptureError",
    "Mesh",
    "PABConfig",
    "PassError",
    "PatchParallelVAE",
    "PipeFusionConfig",
    "Plan",
    "VideoLayout",
    "inspect",
    "load",
    "optimize",
    "optimize_vae",
    "plan",
    "report",
]
