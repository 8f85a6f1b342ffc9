"""vdopt model zoo: our own video DiTs and thin builders for diffusers ones.

``build(name, size)`` returns ``(model, args, kwargs)`` ready for ``model(*args, **kwargs)``.
"""

if __name__ != "vdopt.models":  # imported as a bare 'models' because the repository root is on sys.path
    from vdopt._bare_import import import_installed_instead

    import_installed_instead(__name__, __path__)
else:
    from vdopt.models.opensora import STDiT3, STDiT3Config
    from vdopt.models.opensora_plan import OpenSoraPlanConfig, OpenSoraPlanT2V
    from vdopt.models.pab_defaults import PAB_DEFAULTS, default_pab_config
    from vdopt.models.upstream import load_upstream
    from vdopt.models.zoo import ModelSpec, VideoShape, build, get_spec, list_models, num_tokens

    __all__ = [
        "ModelSpec",
        "OpenSoraPlanConfig",
        "OpenSoraPlanT2V",
        "PAB_DEFAULTS",
        "STDiT3",
        "STDiT3Config",
        "VideoShape",
        "build",
        "default_pab_config",
        "get_spec",
        "list_models",
        "load_upstream",
        "num_tokens",
    ]
