"""One AOTInductor package: re-export a rewritten graph, compile it, load it back.

Packages hold code only (``aot_inductor.package_constants_in_so=False``); the weights are
loaded once per rank and handed to every package as user-managed constants, so PAB's
variants share one copy instead of each embedding the model.

Loading on GPUs (researched from upstream reports; NOT verified on a GPU): a package of even
a trivial model failed to load on the H100 machine (torch 2.11). The matching upstream
report is pytorch/pytorch#173706 (regression since 2.10, open when last seen): in a fresh
process ``aoti_load_package`` reads the device information through
``torch._inductor.codecache`` without importing it and fails; it works in the process that
compiled the package, which has imported it. torch 2.13 imports it explicitly. Workaround
here: ``import torch._inductor.codecache`` before loading. Two neighbouring traps are
avoided too: ``load_package`` treats any ``RuntimeError`` of the new loader as an "outdated
package" and falls back to a legacy loader that fails obscurely on CUDA packages when CUDA
is unusable (pytorch/pytorch#145730, fixed after 2.11), so ``load`` checks CUDA and the
compute capability itself first (``checks.check_environment``); and without
``device_index`` every rank would load onto ``cuda:0`` (pytorch/pytorch#152087), so each rank
passes its own device.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from vdopt.artifacts.errors import ArtifactError
from vdopt.passes.graph_utils import copying_exported_graphs

PACKAGE_OPTIONS = {"aot_inductor.package_constants_in_so": False}
"""Inductor options for every package: code only, weights come from ``weights.rank{r}.pt``."""


def example_inputs(gm: torch.fx.GraphModule) -> tuple[tuple, dict]:
    """Inputs for re-exporting ``gm``, made from its placeholders' ``meta["val"]``.

    Export only traces, so values do not matter: random tensors of each placeholder's
    shape, dtype, strides and device, and the constants themselves. A graph with pytree
    codegen (``ep.module()``) gets ``(args, kwargs)`` in the model's call convention.
    """
    leaves = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if "val" not in node.meta:
            raise ArtifactError(f"graph input {node.name} has no meta['val']: cannot export it")
        val = node.meta["val"]
        if isinstance(val, torch.Tensor):
            real = torch.empty_strided(tuple(val.shape), tuple(val.stride()), dtype=val.dtype, device=val.device)
            real.copy_(torch.randn(val.shape).to(val.dtype) if val.is_floating_point() else torch.ones(val.shape, dtype=val.dtype))
            leaves.append(real)
        else:
            leaves.append(val)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        args, kwargs = pytree.tree_unflatten(leaves, info.in_spec)
        return tuple(args), dict(kwargs)
    return tuple(leaves), {}


def export_graph(gm: torch.fx.GraphModule) -> torch.export.ExportedProgram:
    """Re-export a rewritten graph (same call convention) for AOTInductor."""
    args, kwargs = example_inputs(gm)
    with torch.no_grad():
        return torch.export.export(gm, args, kwargs, strict=False)


def exported_constants(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Parameters, buffers and lifted constants of ``ep`` by the names AOTInductor uses."""
    out = {k: v for k, v in ep.state_dict.items()}
    out.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    return out


def group_names(gm: torch.fx.GraphModule) -> dict[str, list[int]]:
    """Process groups the graph names (functional collectives, ``vdopt::`` ops): name -> ranks."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    if not (dist.is_available() and dist.is_initialized()):
        return {}
    found: dict[str, list[int]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for value in pytree.tree_leaves((node.args, node.kwargs)):
            if not isinstance(value, str) or value in found:
                continue
            try:
                group = _resolve_process_group(value)
            except Exception:  # not a group name (e.g. a reduce op "sum")
                continue
            found[value] = dist.get_process_group_ranks(group)
    return found


def compile_package(ep: torch.export.ExportedProgram, package: Path, rank: int, world: int) -> None:
    """AOT-compile ``ep`` into the package file ``package``."""
    # Inductor deep-copies the graph it compiles (torch/_dynamo/repro/after_aot.py)
    with _private_inductor_cache(rank, world), copying_exported_graphs():
        torch._inductor.aoti_compile_and_package(ep, package_path=str(package), inductor_configs=PACKAGE_OPTIONS)


@contextlib.contextmanager
def _private_inductor_cache(rank: int, world: int):
    """Give each rank its own Inductor cache directory while it compiles packages.

    Ranks of a symmetric mesh build identical graphs, so AOTInductor writes them to the same
    cache path; it re-links the ``.so`` in place under a lock but packages it after releasing
    the lock, so one rank could zip a library that another rank is rewriting (a race found by
    reading the code; not observed).
    """
    if world == 1:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import cache_dir, temporary_cache_dir

    with temporary_cache_dir(os.path.join(cache_dir(), f"vdopt-rank{rank}")):
        yield


def load_package(path: Path, device_index: int) -> Any:
    """The runner of an AOTInductor package (``device_index`` -1 for the CPU)."""
    # torch 2.10 and 2.11 read the device information through ``torch._inductor.codecache``
    # without importing it (pytorch/pytorch#173706), so a fresh process that never compiled
    # anything failed to load any package. Importing it first is harmless on every version.
    import torch._inductor.codecache  # noqa: F401

    return torch._inductor.aoti_load_package(str(path), device_index=device_index)


def needed_constants(package: Path, available: Mapping[str, torch.Tensor], name: str, device: torch.device) -> list[str]:
    """The constants the package reads (AOTInductor drops unused ones); fails at save, not load."""
    index = device.index if device.type == "cuda" and device.index is not None else -1
    needed = sorted(load_package(package, index).get_constant_fqns())
    missing = [fqn for fqn in needed if fqn not in available]
    if missing:
        raise ArtifactError(f"variant {name}: the package needs constants that export did not list: {missing[:5]}")
    return needed
