"""Patch-parallel VAE: the latent is cut into slabs of rows (height) over every rank.

* ``slab``: the model of a tensor whose dim holds a cut spatial axis, and the row arithmetic
  of convolutions, padding and resampling on such slabs (pure, no graph);
* ``exchange``: the nodes that move rows between ranks: halo exchange, gather, local take;
* ``spatial_ops``: the per-op rewrites for ops that mix rows (convolution, padding, group
  norm, nearest resampling, attention);
* ``rewrite``: the pass: ``find_spatial_sites`` then the rewrite of the whole graph.
"""
