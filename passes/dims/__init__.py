"""The dimension core: how each ATen op moves dims, and the one emitter that rewrites for a cut dim.

* ``rules``: the op table, as data: per op, how input dims map to output dims;
* ``emit``: the emitter: nodes with fake values and metadata, chunks of a dim, resized views;
* ``sharded_shape``: the model of a tensor whose dims are split over ranks;
* ``propagation``: sharding propagation over a graph (sequence parallel, DSP, CFG parallel);
  ``need_gather``: the signal a rule gives when it cannot keep its inputs split;
* ``flex_local``: flex attention on a split batch or split heads (its index-reading subgraphs).

PipeFusion's patches and the temporal layout pass read the same table and use the same emitter.
"""
