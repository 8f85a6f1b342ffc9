"""Ahead-of-time artifacts: ``opt.save(path)`` writes them, ``vdopt.load(path, mesh)`` runs them.

An artifact is a directory::

    manifest.json                   what was saved and for what, with every file's sha256 (written last)
    weights.rank{r}.pt              every constant rank r's packages need, stored once
    plan{i}/{variant}.rank{r}.pt2   one AOTInductor package per input signature, variant, rank

Each plan (input signature the model was called with) holds one package per *variant* of
its program: ``main`` for a plain program, one per pattern of reused kinds for PAB.

Modules, one concept each (imports go downward in this list):

- ``errors``     ``ArtifactError``
- ``files``      sha256 records, verification, fsync
- ``ranks``      the collectives that keep ranks in step (ok/failed exchange)
- ``signature``  the saved call signature and input records
- ``manifest``   format, versions, building and reading ``manifest.json``
- ``programs``   program kinds and variants (plain graph, PAB) and rebuilding them
- ``packages``   re-export, AOTInductor compile and load of one package
- ``staging``    atomic directory write: staging directory, swap into place, leftovers
- ``checks``     does an artifact fit this process (versions, device, world, mesh, groups)
- ``saving``     ``save(opt, path)``
- ``loaded``     ``LoadedModel``
- ``loading``    ``load(path, mesh)``

The modules are ``saving`` and ``loading``, not ``save`` and ``load``: a submodule named like
the function this package exports would be shadowed by it (``vdopt.artifacts.save`` is the
function).

This package sits above ``vdopt.runtime`` (it saves and rebuilds its programs); the runtime
never imports it.
"""

from vdopt.artifacts.checks import check_environment, check_groups, check_world_size, resolve_mesh
from vdopt.artifacts.errors import ArtifactError
from vdopt.artifacts.files import file_record, sha256_of, verify_file
from vdopt.artifacts.loading import LoadedPlan, load
from vdopt.artifacts.loaded import LoadedModel
from vdopt.artifacts.manifest import FORMAT, FORMAT_VERSION, MANIFEST, device_info, model_config, read_manifest
from vdopt.artifacts.packages import PACKAGE_OPTIONS, example_inputs, export_graph, exported_constants, group_names
from vdopt.artifacts.programs import program_parts, rebuild_program
from vdopt.artifacts.saving import save
from vdopt.artifacts.signature import bind_saved_call, call_signature, explain_mismatch, signature_record
from vdopt.artifacts.staging import remove_leftovers

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "PACKAGE_OPTIONS",
    "ArtifactError",
    "LoadedModel",
    "LoadedPlan",
    "bind_saved_call",
    "call_signature",
    "check_environment",
    "check_groups",
    "check_world_size",
    "device_info",
    "example_inputs",
    "explain_mismatch",
    "export_graph",
    "exported_constants",
    "file_record",
    "group_names",
    "load",
    "model_config",
    "program_parts",
    "read_manifest",
    "rebuild_program",
    "remove_leftovers",
    "resolve_mesh",
    "save",
    "sha256_of",
    "signature_record",
    "verify_file",
]
