"""``save(opt, path)``: compile every plan of an optimized model into an artifact, on every rank.

Each rank writes its own packages and weights into one staging directory next to the target
(``staging.StagingDir``) and fsyncs them. The ranks then exchange an ok/failed flag: if any
rank failed, every rank raises at once (the failing rank its own error, the others an error
naming it) and nothing is renamed, so an artifact already at the target stays as it was. Only
when all succeeded does rank 0 write the manifest and swap the directory into place, and the
other ranks return once it reports the swap done.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from vdopt.artifacts.errors import ArtifactError
from vdopt.artifacts.files import file_record, fsync_file, write_json_durably
from vdopt.artifacts.manifest import MANIFEST, build_manifest, device_info
from vdopt.artifacts.packages import compile_package, export_graph, exported_constants, group_names, needed_constants
from vdopt.artifacts.programs import program_parts
from vdopt.artifacts.ranks import describe_failures, exchange_outcomes, rank_world
from vdopt.artifacts.staging import StagingDir, check_target

log = logging.getLogger(__name__)


def save(opt: Any, path: str | os.PathLike) -> Path:
    """Write ``opt``'s plans as AOTInductor artifacts at ``path``; call it on every rank.

    Every input signature ``opt`` has been called with (or given as ``example_inputs``) is
    saved. With several ranks, ``path`` must be on a filesystem every rank sees. An artifact
    already at ``path`` is replaced only once the new one is complete.
    """
    from vdopt.runtime.executable import model_device

    if getattr(opt, "_guarded", None):
        raise ArtifactError(
            "plans specialized on data-dependent values (see opt.report()) cannot be saved: "
            "AOT artifacts carry no guards; save a model whose forward has no branch or size "
            "taken from tensor values"
        )
    plans = list(opt._plans.items())  # (input key, plan), one per input signature
    if not plans:
        raise ArtifactError(
            "nothing to save yet: artifacts are compiled for the input shapes the model was called "
            "with; call the optimized model once (or pass example_inputs to vdopt.optimize) first"
        )
    rank, world = rank_world()
    if world != opt.mesh.size:
        raise ArtifactError(f"save runs on every rank of Mesh({opt.mesh.describe()}), but the world size is {world}")
    path = Path(path).absolute()
    check_target(path, MANIFEST)

    # Rank 0 creates the staging directory (removing leftovers of killed saves); the others learn where.
    staging, error = None, None
    if rank == 0:
        try:
            staging = StagingDir(path)
        except Exception as e:
            error = e
    shared, failures = exchange_outcomes(str(staging.path) if staging else None, error)
    _raise_if_failed(failures, error, path, "preparing")
    tmp = Path(shared[0])
    try:
        record, error = None, None
        try:
            record = _save_rank(opt, plans, tmp, rank, model_device(opt._model))
        except Exception as e:
            error = e
        records, failures = exchange_outcomes(record, error)
        _raise_if_failed(failures, error, path, "writing")

        error = None
        if rank == 0:
            try:
                write_json_durably(tmp / MANIFEST, build_manifest(opt, plans, records, world))
                staging.commit()
            except Exception as e:
                error = e
        _, failures = exchange_outcomes(None, error)
        _raise_if_failed(failures, error, path, "renaming")
    finally:
        if staging is not None:
            staging.close()  # the failed save's files, or the artifact it replaced
    log.info("saved %d plan(s) of %s to %s", len(plans), opt._model_name, path)
    return path


def _raise_if_failed(failures: dict[int, str], error: Exception | None, path: Path, step: str) -> None:
    """Fail every rank together: a failed rank raises its own error, the others name it."""
    if not failures:
        return
    if error is not None:
        raise error
    raise ArtifactError(
        f"saving {path} failed while {step} on rank(s) {', '.join(map(str, sorted(failures)))} "
        f"({describe_failures(failures)}); nothing was written at {path} (an artifact already there is "
        "unchanged): fix that rank's error (see its log) and save again"
    )


def _save_rank(opt: Any, plans: Sequence[Any], tmp: Path, rank: int, device: torch.device) -> dict[str, Any]:
    """This rank's packages and weights, fsynced; returns what the manifest needs from this rank."""
    from vdopt.progress import progress

    parts = [program_parts(plan.program) for _, plan in plans]
    total = sum(len(graphs) for _, _, graphs in parts)
    weights: dict[str, torch.Tensor] = {}
    stored_as: dict[tuple, str] = {}  # tensor identity -> stored name, so shared weights are stored once
    plan_records = []
    groups: dict[str, list[int]] = {}
    with progress(total, f"vdopt save {opt._model_name}", enabled=rank == 0) as bar:
        for index, (kind, spec, graphs) in enumerate(parts):
            (tmp / f"plan{index}").mkdir(exist_ok=True)
            variants = {}
            for name, gm in graphs.items():
                bar.set_postfix_str(f"plan {index} {name}")
                start = time.perf_counter()
                groups.update(group_names(gm))
                ep = export_graph(gm)
                package = tmp / f"plan{index}" / f"{name}.rank{rank}.pt2"
                compile_package(ep, package, rank, opt.mesh.size)
                fsync_file(package)
                available = exported_constants(ep)
                constants = {}
                for fqn in needed_constants(package, available, name, device):
                    tensor = available[fqn]
                    key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                           tuple(tensor.stride()), tensor.dtype, tensor.device)
                    if key not in stored_as:
                        stored = fqn if fqn not in weights else f"{fqn}#{len(weights)}"
                        stored_as[key] = stored
                        weights[stored] = tensor.detach().clone() if tensor.untyped_storage().nbytes() > tensor.nbytes else tensor.detach()
                    constants[fqn] = stored_as[key]
                variants[name] = {"package": file_record(tmp, package), "constants": constants,
                                  "compile_s": round(time.perf_counter() - start, 3)}
                bar.update(1)
            plan_records.append({"kind": kind, "spec": spec, "variants": variants})
    weights_path = tmp / f"weights.rank{rank}.pt"
    torch.save(weights, weights_path)
    fsync_file(weights_path)
    return {"rank": rank, "plans": plan_records, "weights": file_record(tmp, weights_path),
            "groups": groups, "device": device_info(device)}
