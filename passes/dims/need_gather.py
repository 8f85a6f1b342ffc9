"""The one signal every sharding rule gives when it cannot keep its inputs split."""


class NeedGather(Exception):
    """A rule cannot keep its inputs sharded: gather them and run the op replicated (always exact)."""
