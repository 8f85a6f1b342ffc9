"""vdopt's Triton attention kernels (imported lazily: ``import vdopt`` works without Triton).

``attention`` is the entry point; the kernel modules (``flash_attention``,
``temporal_attention``) import Triton and are only loaded when a kernel is launched.
"""

if __name__ != "vdopt.kernels":  # imported as a bare 'kernels' because the repository root is on sys.path
    from vdopt._bare_import import import_installed_instead

    import_installed_instead(__name__, __path__)
else:
    from vdopt.kernels.api import attention

    __all__ = ["attention"]
