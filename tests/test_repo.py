"""The repository as a new user gets it: set-up commands, what is tracked, what imports."""

from __future__ import annotations

import importlib.machinery
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_TRACKED_BYTES = 1 << 20
SOURCE_FOLDERS = ("passes", "kernels", "models")  # installed as vdopt.<name>


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(c for c in _readme_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, f"the README's test command {test_command!r} is not a line of .ci/run"
    assert ci[-1] == test_command, ".ci/run must end with the README's test command (its exit code is CI's)"


def _tracked_files() -> list[pathlib.Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [ROOT / name for name in out.stdout.decode().split("\0") if name]


def test_no_tracked_file_over_one_megabyte():
    big = {str(p.relative_to(ROOT)): p.stat().st_size for p in _tracked_files() if p.is_file() and p.stat().st_size > MAX_TRACKED_BYTES}
    assert not big, f"tracked files over 1 MB (binaries and build outputs belong outside git): {big}"


def test_every_source_package_is_installed():
    """A non-editable install copies only the packages pyproject lists."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for package, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    assert found - listed == set(), f"packages missing from pyproject's [tool.setuptools] packages: {sorted(found - listed)}"


def _import_from_root(code: str) -> subprocess.CompletedProcess:
    # `python -c` puts the working directory first on sys.path, as `python -m pytest` does
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", SOURCE_FOLDERS)
def test_source_folder_never_shadows_a_bare_import(name):
    outside_root = [p for p in sys.path if pathlib.Path(p or ".").resolve() != ROOT]
    installed = importlib.machinery.PathFinder.find_spec(name, outside_root)
    result = _import_from_root(f"import {name}; print({name}.__file__)")
    if installed is not None:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == installed.origin, f"'import {name}' from the root found {result.stdout.strip()}"
    else:
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, result.stdout + result.stderr
        assert f"vdopt.{name}" in result.stderr  # the message says how the folder is imported


def test_transformers_and_diffusers_import_from_the_repository_root():
    result = _import_from_root(
        "import transformers, diffusers, vdopt\n"
        "from transformers import T5EncoderModel, AutoTokenizer\n"
        "from diffusers import WanPipeline\n"
        "import vdopt.kernels, vdopt.models, vdopt.passes\n"
        "print(vdopt.kernels.__name__, vdopt.models.build.__module__)"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["vdopt.kernels", "vdopt.models.zoo"]
