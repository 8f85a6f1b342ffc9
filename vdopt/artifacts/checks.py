"""Does an artifact fit this process? Versions, device, world size, mesh and process groups.

Every check runs before anything is loaded and says what differs and what to do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist

from vdopt.artifacts.errors import ArtifactError
from vdopt.artifacts.manifest import device_info, vdopt_version
from vdopt.mesh import Mesh

log = logging.getLogger(__name__)


def _local_device(kind: str) -> torch.device:
    if kind == "cuda":
        index = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
        return torch.device("cuda", index)
    return torch.device(kind)


def check_environment(manifest: Mapping[str, Any], root: Path) -> torch.device:
    """Versions and device; returns the device this rank loads onto."""
    saved = manifest["versions"]
    if saved["torch"] != torch.__version__:
        raise ArtifactError(
            f"artifact {root} was compiled with torch {saved['torch']}, this process runs torch {torch.__version__}; "
            "AOTInductor packages load only in the torch build that made them: install that torch, "
            "or re-create the artifact here (opt.save or `vdopt compile`)"
        )
    if saved["vdopt"] != vdopt_version():
        log.warning("artifact %s was saved by vdopt %s, this is vdopt %s", root, saved["vdopt"], vdopt_version())
    want = manifest["device"]
    if want["type"] == "cuda":
        if not torch.cuda.is_available():
            raise ArtifactError(
                f"artifact {root} was compiled for CUDA ({want['name']}) but CUDA is not available in this "
                "process; load it on a GPU machine, or re-create it here for the CPU"
            )
        device = _local_device("cuda")
        have = device_info(device)
        if have["capability"] != want["capability"]:
            raise ArtifactError(
                f"artifact {root} was compiled for {want['name']} (sm {want['capability']}), this GPU is "
                f"{have['name']} (sm {have['capability']}); re-create the artifact on this GPU"
            )
        return device
    if want["type"] != "cpu":
        raise ArtifactError(f"artifact {root} was compiled for device {want['type']!r}, which vdopt.load does not support")
    return torch.device("cpu")


def _world_source() -> str:
    if dist.is_available() and dist.is_initialized():
        return "the default process group"
    if "WORLD_SIZE" in os.environ:
        return "torchrun's WORLD_SIZE"
    return "no process group and no torchrun environment"


def check_world_size(manifest: Mapping[str, Any], root: Path) -> None:
    """The world size (of the process group, or torchrun's environment before there is one) is the saved one."""
    degrees = manifest["mesh"]["degrees"]
    saved = ", ".join(f"{a}={d}" for a, d in degrees.items())
    world_saved = manifest["mesh"]["world_size"]
    # The same rule the mesh uses, so load and vdopt.Mesh agree on what the world is.
    world = Mesh.world_size_available()
    if world != world_saved:
        raise ArtifactError(
            f"artifact {root} was saved for world size {world_saved} (Mesh({saved})) but this process runs with "
            f"world size {world} ({_world_source()}): launch with torchrun --nproc-per-node {world_saved}, "
            f"or re-create the artifact for {world} rank(s)"
        )


def resolve_mesh(manifest: Mapping[str, Any], mesh: Mesh | None, root: Path, device: torch.device) -> Mesh:
    """The mesh to run on, with the default process group up (from torchrun's environment if needed).

    ``mesh`` must match the saved degrees; ``None`` means the saved mesh.
    """
    degrees = manifest["mesh"]["degrees"]
    if mesh is None:
        mesh = Mesh(**degrees)
    elif mesh.degrees != degrees:
        saved = ", ".join(f"{a}={d}" for a, d in degrees.items())
        raise ArtifactError(
            f"artifact {root} was saved for Mesh({saved}) but vdopt.load got Mesh({mesh.describe()}); pass the "
            "saved mesh (or mesh=None), or re-create the artifact for this mesh"
        )
    # Like vdopt.Mesh in vdopt.optimize: under torchrun without init_process_group, start the
    # default group from the environment (NCCL on CUDA, gloo on CPU) before anything needs a rank.
    mesh.ensure_process_group(device)
    return mesh


def check_groups(manifest: Mapping[str, Any], mesh: Mesh, device: torch.device, rank: int, root: Path) -> None:
    """Create the mesh's groups and check they carry the names the packages were built with."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    saved = manifest["process_groups"][rank]
    if not saved:
        return
    mesh.axis_groups(device)  # same creation order as when the graphs were built
    for name, ranks in saved.items():
        try:
            have = dist.get_process_group_ranks(_resolve_process_group(name))
        except Exception:
            have = None
        if have != ranks:
            raise ArtifactError(
                f"artifact {root}: rank {rank}'s packages use process group {name!r} over ranks {ranks}, but in this "
                f"process that name is {'unknown' if have is None else f'the group of ranks {have}'}. AOTInductor "
                "bakes group names in: call vdopt.load before creating other process groups (or pass the mesh "
                "the model was optimized with, in the process that optimized it)"
            )
