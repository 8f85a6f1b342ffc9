"""``load(path, mesh)``: run a saved artifact on every rank, without the model's code.

Everything is checked before anything runs: format, torch version, device, world size and
mesh, process group names, and every file this rank reads (size and sha256). Under torchrun
the default process group is started from the environment, as ``vdopt.Mesh`` does. The
rank-local part (verifying and reading files, loading packages) ends with an exchange of
ok/failed flags, so a bad file on one rank fails every rank at once instead of leaving the
others to hang in the model's first collective.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from vdopt.artifacts.checks import check_environment, check_groups, check_world_size, resolve_mesh
from vdopt.artifacts.errors import ArtifactError
from vdopt.artifacts.files import verify_file
from vdopt.artifacts.loaded import LoadedModel
from vdopt.artifacts.manifest import rank_files, read_manifest
from vdopt.artifacts.packages import load_package
from vdopt.artifacts.programs import rebuild_program
from vdopt.artifacts.ranks import describe_failures, exchange_outcomes, rank_world

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class LoadedPlan:
    """One saved input signature and the program that runs it."""

    signature: str
    """Human-readable input signature."""
    inputs: dict[str, Any]
    """``signature_record`` of the saved call."""
    program: Any
    """Runs the calls (``GraphProgram``, ``PABProgram``, ...) over the loaded packages."""
    variants: tuple[str, ...]
    """Names of the packages loaded for this plan."""


def load(path: str | os.PathLike, mesh: Any = None, *, verify: bool = True) -> LoadedModel:
    """Load an artifact saved by ``opt.save`` or ``vdopt compile``; call it on every rank.

    ``mesh`` must have the saved degrees; ``None`` builds the saved mesh. ``verify=False``
    skips the sha256 check of this rank's files (their sizes are still checked): it saves
    reading the weights twice at start-up, for artifacts whose storage is trusted.
    """
    import vdopt.ops  # noqa: F401  registers the vdopt:: ops the packages call

    start = time.perf_counter()
    root = Path(path)
    manifest = read_manifest(root)
    device = check_environment(manifest, root)
    check_world_size(manifest, root)
    mesh = resolve_mesh(manifest, mesh, root, device)
    rank, _ = rank_world()
    check_groups(manifest, mesh, device, rank, root)
    loaded, error = None, None
    try:
        loaded = _load_rank(manifest, root, rank, device, verify)
    except Exception as e:
        error = e
    _, failures = exchange_outcomes(None, error)
    if failures:
        if error is not None:
            raise error
        raise ArtifactError(
            f"cannot load artifact {root}: rank(s) {', '.join(map(str, sorted(failures)))} failed "
            f"({describe_failures(failures)})"
        )
    weights, plans = loaded
    startup_s = time.perf_counter() - start
    log.info("loaded %s from %s in %.2f s", manifest["model"], root, startup_s)
    return LoadedModel(root=root, manifest=manifest, mesh=mesh, plans=plans, weights=weights,
                       device=device, startup_s=startup_s)


def _load_rank(manifest: Mapping[str, Any], root: Path, rank: int, device: torch.device,
               verify: bool) -> tuple[dict[str, torch.Tensor], list[LoadedPlan]]:
    """This rank's weights and plans, after verifying every file it reads."""
    for record in rank_files(manifest, rank):
        verify_file(root, record, check_hash=verify)
    weights_path = root / manifest["weights"][rank]["path"]
    try:
        weights = torch.load(weights_path, map_location=device, mmap=True, weights_only=True)
    except Exception as e:
        raise ArtifactError(f"cannot read {weights_path} ({type(e).__name__}: {e}); save the artifact again") from None
    device_index = device.index if device.type == "cuda" else -1
    plans = []
    for plan in manifest["plans"]:
        runners = {}
        for name, variant in plan["variants"].items():
            package = root / variant["packages"][rank]["path"]
            try:
                runner = load_package(package, device_index)
            except Exception as e:
                raise ArtifactError(f"cannot load {package} ({type(e).__name__}: {e}); save the artifact again") from None
            _, out_spec = runner.loader.get_call_spec()
            _import_spec_types(out_spec)
            runner.load_constants(
                {fqn: weights[stored] for fqn, stored in variant["constants"][rank].items()},
                check_full_update=True, user_managed=True,
            )
            runners[name] = runner
        _import_spec_types(plan["spec"].get("out_spec"))
        plans.append(LoadedPlan(
            signature=plan["signature"], inputs=plan["inputs"], variants=tuple(runners),
            program=rebuild_program(plan["program"], plan["spec"], runners),
        ))
    return weights, plans


def _import_spec_types(spec: str | None) -> None:
    """Import the modules that define the pytree node types a serialized spec names.

    Output containers such as diffusers' ``Transformer2DModelOutput`` register themselves
    with pytree when their module is imported; the loading process may not have done so.
    """
    if not spec:
        return
    stack = [json.loads(spec)[1]]
    while stack:
        node = stack.pop()
        type_name = node.get("type")
        if type_name and not type_name.startswith(("builtins.", "collections.")):
            module = type_name.rpartition(".")[0]
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ArtifactError(
                    f"the model's outputs are {type_name}, whose module {module} cannot be imported here ({e}); "
                    "install it, or save a model called with return_dict=False"
                ) from None
        stack.extend(node.get("children_spec") or [])
