"""The dimension core: how each ATen op moves dims (as data) and the one emitter that rewrites a graph for a sharded, patched or re-laid-out dim."""
