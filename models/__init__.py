"""vdopt model zoo: our own video DiTs and thin builders for diffusers ones.

``build(name, size)`` returns ``(model, args, kwargs)`` ready for ``model(*args, **kwargs)``.
"""

from .opensora import STDiT3, STDiT3Config
from .opensora_plan import OpenSoraPlanConfig, OpenSoraPlanT2V
from .pab_defaults import PAB_DEFAULTS, default_pab_config
from .zoo import ModelSpec, VideoShape, build, get_spec, list_models, num_tokens

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
    "num_tokens",
]
