"""User-facing values are checked where they enter: Mesh specs, PABConfig, PipeFusionConfig."""

from __future__ import annotations

import pytest

import vdopt
from vdopt.config import PABConfig, PipeFusionConfig
from vdopt.mesh import AXES, Mesh, as_mesh, parse_degrees


@pytest.mark.parametrize(
    "text, degrees",
    [
        ("ulysses=2", {"ulysses": 2}),
        ("ulysses=2,cfg=2", {"ulysses": 2, "cfg": 2}),
        (" ring = 4 , dsp=1 ", {"ring": 4, "dsp": 1}),
    ],
)
def test_parse_degrees_reads_the_cli_syntax(text, degrees):
    assert parse_degrees(text) == degrees


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "empty"),
        ("ulysses", "not axis=degree"),
        ("tensor=2", "unknown axis 'tensor'"),
        ("ulysses=two", "positive integer"),
        ("ulysses=0", "positive integer"),
        ("ulysses=2,ulysses=2", "given twice"),
    ],
)
def test_parse_degrees_says_what_is_wrong_and_the_syntax(text, says):
    with pytest.raises(ValueError, match=says) as info:
        parse_degrees(text)
    if says in ("empty", "not axis=degree") or says.startswith("unknown axis"):
        assert all(axis in str(info.value) for axis in AXES)  # a syntax error lists the axes


def test_as_mesh_accepts_none_a_mesh_and_a_spec():
    assert as_mesh(None) is None
    mesh = Mesh()
    assert as_mesh(mesh) is mesh
    assert as_mesh("ulysses=1,cfg=1") == Mesh(ulysses=1, cfg=1)


def test_as_mesh_spec_is_checked_against_the_world_size():
    # one process here: a spec of two ranks is Mesh's own world-size error, naming the degrees
    with pytest.raises(ValueError, match="ulysses=2.*needs 2 ranks"):
        as_mesh("ulysses=2")


@pytest.mark.parametrize("value", [2, 2.0, {"ulysses": 2}, ["ulysses=2"], b"ulysses=2"])
def test_as_mesh_rejects_other_types(value):
    with pytest.raises(TypeError, match="vdopt.Mesh, a string like 'ulysses=2,cfg=2', or None"):
        as_mesh(value)


def test_mesh_rejects_a_bool_degree():
    with pytest.raises(ValueError, match="ulysses=True"):
        Mesh(ulysses=True)


@pytest.mark.parametrize(
    "field, value",
    [
        ("spatial_window", "abc"),
        ("spatial_window", (-5, 1e9)),
        ("temporal_window", (800, 100)),
        ("cross_window", (100,)),
        ("cross_window", (100, float("nan"))),
        ("mlp_window", ("100", "800")),
        ("mlp_window", (True, 800)),
    ],
)
def test_pab_window_errors_name_the_field_and_the_range(field, value):
    with pytest.raises(ValueError, match=rf"PABConfig\.{field}=.*0 <= low <= high <= 1000"):
        PABConfig(**{field: value})


@pytest.mark.parametrize("field", ["spatial_range", "temporal_range", "cross_range", "mlp_range"])
@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_pab_range_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"PABConfig\.{field}=.*positive int .* or None"):
        PABConfig(**{field: value})


def test_pab_valid_values_pass_and_a_list_window_becomes_a_tuple():
    config = PABConfig(spatial_range=3, temporal_range=None, spatial_window=[0, 1000], cross_window=(50.5, 900))
    assert config.spatial_window == (0, 1000) and isinstance(config.spatial_window, tuple)
    hash(config)  # frozen and hashable: usable as a key


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"patches": 0}, r"PipeFusionConfig\.patches=0: must be a positive int"),
        ({"patches": "2"}, r"PipeFusionConfig\.patches='2': must be a positive int"),
        ({"patches": True}, r"PipeFusionConfig\.patches=True"),
        ({"warmup_steps": -1}, r"PipeFusionConfig\.warmup_steps=-1: must be an int >= 0"),
        ({"warmup_steps": 1.0}, r"PipeFusionConfig\.warmup_steps=1\.0"),
        ({"axis": "X"}, r"PipeFusionConfig\.axis='X': must be 'T', 'H', 'W' or None"),
        ({"balance": "fast"}, r"PipeFusionConfig\.balance='fast': must be 'flops' or 'measured'"),
    ],
)
def test_pipefusion_errors_name_the_field(kwargs, says):
    with pytest.raises(ValueError, match=says):
        PipeFusionConfig(**kwargs)


def test_configs_are_exported():
    assert vdopt.PABConfig is PABConfig and vdopt.PipeFusionConfig is PipeFusionConfig
