"""vdopt's Triton attention kernels (imported lazily: ``import vdopt`` works without Triton).

The kernel modules (``flash_attention``, ``temporal_attention``) import Triton and are only
loaded when a kernel is launched. The public entry, ``vdopt.kernels.attention``, runs the
registered ``vdopt::attention`` op, so it lives above this package (``vdopt.attention``) and is
re-exported here on first access (PEP 562), never at import: the kernels import no op.
"""

if __name__ != "vdopt.kernels":  # imported as a bare 'kernels' because the repository root is on sys.path
    from vdopt._bare_import import import_installed_instead

    import_installed_instead(__name__, __path__)
else:
    __all__ = ["attention"]

    def __getattr__(name: str):
        if name == "attention":
            from vdopt.attention import attention

            return attention
        raise AttributeError(f"module 'vdopt.kernels' has no attribute {name!r}")
