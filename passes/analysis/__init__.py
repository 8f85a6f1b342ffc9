"""Analysis passes: they tag nodes (attention sites, blocks) and never rewrite."""

from vdopt.passes.analysis.sites import KINDS, AttentionSite, VideoLayout

__all__ = ["KINDS", "AttentionSite", "VideoLayout"]
