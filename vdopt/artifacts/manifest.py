"""``manifest.json``: what an artifact holds and what it was made for; written last, read first.

It records the call signature, every plan's input leaves (shape, dtype, device, constant
values) and output structure (a pytree spec), the program's step data (the PAB schedule),
the mesh degrees and the process groups the graphs name, the torch / triton / vdopt versions,
the device, and every file's path, size and sha256 (per rank: ``weights`` and each variant's
``packages``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from vdopt.artifacts.errors import ArtifactError
from vdopt.artifacts.signature import call_signature, signature_record

FORMAT = "vdopt-aot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def vdopt_version() -> str:
    # The installed distribution's version (pyproject.toml), not ``vdopt.__version__``: the
    # package's ``__init__`` is the API layer, above artifacts, and imports this module.
    try:
        return importlib.metadata.version("vdopt")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def device_info(device: torch.device) -> dict[str, Any]:
    """What a package compiled for ``device`` needs from the machine that loads it."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "capability": [props.major, props.minor]}
    return {"type": device.type, "name": platform.machine(), "capability": None}


def model_config(model: torch.nn.Module) -> dict[str, Any] | None:
    """The model's ``config`` (diffusers models have one) if it is JSON data, else None."""
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        return None
    try:
        return json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError):
        return None


def build_manifest(opt: Any, plans: Sequence[Any], records: list[dict[str, Any]], world: int) -> dict[str, Any]:
    """The manifest of ``opt``'s ``plans`` from every rank's record (``saving._save_rank``)."""
    first = records[0]
    out_plans = []
    for index, (key, plan) in enumerate(plans):
        base = first["plans"][index]
        out_plans.append({
            "signature": plan.signature,
            "inputs": signature_record(key),
            "program": base["kind"],
            "spec": base["spec"],
            "variants": {
                name: {
                    "packages": [r["plans"][index]["variants"][name]["package"] for r in records],
                    "constants": [r["plans"][index]["variants"][name]["constants"] for r in records],
                    "compile_s": [r["plans"][index]["variants"][name]["compile_s"] for r in records],
                }
                for name in base["variants"]
            },
        })
    pab = next((p["spec"].get("rules") for p in out_plans if p["spec"].get("rules") is not None), None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": opt._model_name,
        "versions": {"torch": torch.__version__, "triton": triton_version(), "vdopt": vdopt_version(),
                     "python": platform.python_version()},
        "device": first["device"],
        "mesh": {"degrees": opt.mesh.degrees, "world_size": world},
        "process_groups": [r["groups"] for r in records],
        "call": call_signature(opt._model),
        "config": model_config(opt._model),
        "pab_schedule": pab,
        "weights": [r["weights"] for r in records],
        "plans": out_plans,
    }


def rank_files(manifest: Mapping[str, Any], rank: int) -> list[Mapping[str, Any]]:
    """The file records (path, bytes, sha256) rank ``rank`` loads: its weights, then its packages."""
    files = [manifest["weights"][rank]]
    for plan in manifest["plans"]:
        files.extend(variant["packages"][rank] for variant in plan["variants"].values())
    return files


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the artifact at ``path``, or an ``ArtifactError`` saying what is wrong."""
    root = Path(path)
    if not root.exists():
        raise ArtifactError(f"no artifact at {root}: save one with opt.save(path) or `vdopt compile MODEL --out {root}`")
    if not root.is_dir():
        raise ArtifactError(f"{root} is a file; a vdopt artifact is the directory opt.save or `vdopt compile` writes")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{root} has no {MANIFEST}: it is not a vdopt artifact, or its save did not finish "
            "(the manifest is written last and the directory renamed into place); save it again"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{manifest_path} is corrupt ({e}); save the artifact again") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path} is format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this vdopt reads {FORMAT!r} version {FORMAT_VERSION}: save the artifact again with this vdopt"
        )
    return manifest
