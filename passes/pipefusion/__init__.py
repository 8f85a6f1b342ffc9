"""PipeFusion: stage split at block boundaries and the per-patch graph rewrite."""
