"""Keep vdopt's top-level source folders from shadowing installed distributions.

``passes/``, ``kernels/`` and ``models/`` are installed as ``vdopt.passes``, ``vdopt.kernels``
and ``vdopt.models``. Python run from the repository root (``python -m pytest``, ``python -c``)
has the root on ``sys.path``, so a bare ``import kernels`` would find our folder before the
real ``kernels`` distribution (which transformers imports). Each folder's ``__init__`` calls
``import_installed_instead`` when it is imported under its bare name: the import then yields
the installed distribution, or fails as if the folder were not there.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence


def import_installed_instead(name: str, folder_path: Sequence[str]) -> None:
    """Replace the module being imported as ``name`` by the installed distribution of that name.

    ``folder_path`` is the ``__path__`` of our folder; its parent (the repository root) is left
    out of the search. Python's import returns ``sys.modules[name]`` after running the folder's
    ``__init__``, so the caller gets the installed module.
    """
    roots = {os.path.dirname(os.path.abspath(p)) for p in folder_path}
    search = [p for p in sys.path if os.path.abspath(p or os.curdir) not in roots]
    spec = importlib.machinery.PathFinder.find_spec(name, search)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {folder_path[0]} is vdopt's source and is "
            f"imported as 'vdopt.{name}')",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
