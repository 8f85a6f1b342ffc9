"""The command line and the README's set-up commands."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def vdopt_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdopt.cli", *args], capture_output=True, text=True, timeout=600)


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    demo = [c for c in commands if c.endswith("vdopt demo")]
    tests = [c for c in commands if "pytest" in c]
    assert len(demo) == 1 and demo[0].startswith("python -m pip install -e .")
    assert len(tests) == 1
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests[0] in ci.splitlines()


def test_demo_runs_and_matches_eager():
    # The README's demo command is `pip install -e . && vdopt demo`; the install is this
    # environment's, so run the second half exactly as a user would.
    result = vdopt_cli("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result: matches eager" in result.stdout


def test_inspect_prints_the_site_table():
    result = vdopt_cli("inspect", "latte")
    assert result.returncode == 0, result.stderr
    assert "6 attention sites: spatial 2, cross 2, temporal 2" in result.stdout
    assert "temporal_transformer_blocks.1.attn1" in result.stdout
