"""Keys vdopt stores in ``torch.fx.Node.meta``.

Every key is prefixed ``vdopt.`` so it never collides with torch's own metadata. Analysis
writes the site and block tags; every node a pass creates carries ``CREATED_BY``.
"""

SITE = "vdopt.site"
"""The ``AttentionSite`` an attention node belongs to (set by analysis on the SDPA node)."""

BLOCK = "vdopt.block"
"""The transformer block a node belongs to (``str`` such as ``"transformer_blocks.3"``)."""

CREATED_BY = "vdopt.created_by"
"""Name of the pass that created the node."""

STAGE_BOUNDARY = "vdopt.stage_boundary"
"""Set on pipeline stage marker nodes (PipeFusion)."""

COMM = "vdopt.comm"
"""On collective nodes a pass inserts: ``vdopt.collectives.CommRecord`` (kind, bytes this rank
sends per call, the attention site or purpose it serves)."""
