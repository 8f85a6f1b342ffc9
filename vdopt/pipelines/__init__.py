"""Whole diffusers pipelines: every denoiser optimized, the VAE patch-parallel, the rest in place.

``vdopt.optimize(pipe, mesh)`` dispatches here (``optimize_pipeline``); ``vdopt.report(pipe)``
describes the result (``report_pipeline``).
"""

from vdopt.pipelines.components import classify, is_autoencoder, is_pipeline
from vdopt.pipelines.optimize_pipeline import optimize_pipeline
from vdopt.pipelines.report import report_pipeline

__all__ = ["classify", "is_autoencoder", "is_pipeline", "optimize_pipeline", "report_pipeline"]
