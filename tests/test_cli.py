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


def vdopt_cli(*args: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vdopt.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    demo = [c for c in commands if c.endswith("vdopt demo")]
    tests = [c for c in commands if "pytest" in c]
    assert len(demo) == 1 and demo[0].startswith("python -m pip install -e .")
    assert len(tests) == 1
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests[0] in ci.splitlines()


def test_demo_goes_from_text_to_a_video_that_matches_the_unoptimized_pipeline(tmp_path):
    # The README's demo command is `pip install -e . && vdopt demo`; the install is this
    # environment's, so run the second half exactly as a user would (in an empty directory:
    # it writes the video there). 4 gloo ranks: cfg=2 pairs Wan's cond/uncond calls, ulysses=2.
    import imageio

    result = vdopt_cli("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result: matches the unoptimized pipeline" in result.stdout
    assert "mesh: cfg=2, ulysses=2, 4 rank(s) over gloo" in result.stdout
    assert "transformer: optimized (CFGPairing of WanTransformer3DModel" in result.stdout
    paired = re.search(r"CFG pairing: (\d+) step\(s\) ran cond and uncond at once", result.stdout)
    assert paired and int(paired.group(1)) == 6, result.stdout  # 4 steps, first observed; 2 generations
    reader = imageio.get_reader(tmp_path / "vdopt-demo.mp4", "ffmpeg")
    frames = [frame for frame in reader]
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3)


def test_demo_with_a_zoo_model_matches_eager():
    result = vdopt_cli("demo", "--model", "latte", "--cfg", "2", "--ulysses", "1", "--steps", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result: matches eager" in result.stdout


def test_inspect_prints_the_site_table():
    result = vdopt_cli("inspect", "latte")
    assert result.returncode == 0, result.stderr
    assert "6 attention sites: spatial 2, cross 2, temporal 2" in result.stdout
    assert "temporal_transformer_blocks.1.attn1" in result.stdout


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("vdopt: error")]


def test_a_user_mistake_is_one_line_and_v_adds_the_traceback(tmp_path):
    args = ("compile", "latte", "--mesh", "tensor=2", "--out", str(tmp_path / "art"))
    result = vdopt_cli(*args)
    assert result.returncode == 1
    assert error_lines(result) == [
        "vdopt: error: mesh spec 'tensor=2': unknown axis 'tensor'; write axis=degree pairs separated by commas, "
        "e.g. 'ulysses=2,cfg=2'; axes: cfg, pipefusion, ring, ulysses, dsp"
    ]
    assert "Traceback" not in result.stderr
    verbose = vdopt_cli("-v", *args)
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr
    assert error_lines(verbose) == error_lines(result)


def test_a_failure_on_every_rank_is_reported_once(tmp_path):
    # Two real gloo ranks (spawned by the demo), both rejecting DSP for a model without
    # separate spatial and temporal attention: one line for both, no traceback.
    result = vdopt_cli("demo", "--model", "wan", "--cfg", "1", "--ulysses", "1", "--dsp", "2", "--steps", "1")
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert line.startswith("vdopt: error: every rank: ") and "DSP needs a spatial-temporal model" in line
    assert "Traceback" not in result.stderr


def test_under_torchrun_rank_0_alone_reports_a_user_mistake(tmp_path):
    # Every rank runs the command and fails the same way (3 ranks asked of a world of 2).
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "vdopt.cli", "compile", "latte", "--mesh", "ulysses=3", "--out", str(tmp_path / "art")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode != 0
    (line,) = error_lines(result)
    assert "needs 3 ranks" in line and "world size is 2" in line
    assert "vdopt/mesh.py" not in result.stderr  # no traceback of ours (torchrun adds its own summary)


def all_help_texts() -> list[str]:
    from vdopt.cli import build_parser

    texts = []
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        texts.append(parser.description or "")
        for action in parser._actions:
            texts.append(action.help or "")
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                parsers.extend(action.choices.values())
            for sub in getattr(action, "_choices_actions", []):
                texts.append(sub.help or "")
    return texts


def test_help_texts_stand_alone():
    texts = all_help_texts()
    assert len(texts) > 40  # every command's options were found
    for text in texts:
        assert not re.search(r"ANCHORS|DESIGN|\.md\b", text), text


def test_every_option_has_its_own_help():
    from vdopt.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a.choices, dict))
    for name, parser in sub.choices.items():
        helps = [a.help for a in parser._actions if a.help and a.help != "==SUPPRESS=="]
        duplicates = {h for h in helps if helps.count(h) > 1}
        assert not duplicates, (name, duplicates)
    compile_help = {a.dest: a.help for a in sub.choices["compile"]._actions}
    assert "text tokens" in compile_help["text_len"] and "pixel" not in compile_help["text_len"]


def test_help_lists_the_zoo_models():
    from vdopt.cli import build_parser
    from vdopt.models import list_models

    sub = next(a for a in build_parser()._actions if isinstance(a.choices, dict))
    for command, dest in (("demo", "model"), ("inspect", "model")):
        text = next(a.help for a in sub.choices[command]._actions if a.dest == dest)
        named = set(re.findall(r"\b[a-z_]+\b", text.split(":", 1)[1])) & set(list_models()) if ":" in text else set()
        assert named == set(list_models()), (command, text)
