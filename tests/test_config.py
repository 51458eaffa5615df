"""Presets: every shipped file resolves to valid typed configs, and mistakes fail clearly.

Example: ``pytest tests/test_config.py -q``
"""

from __future__ import annotations

import pytest

from papm_core.config import PRESET_DIR, PruneConfig, SimConfig, from_dict, load_all, load_preset, to_dict
from papm_core.util import PapmError

SHIPPED = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def test_the_three_presets_ship():
    assert {"smoke", "quick", "full"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_preset_loads(name):
    """A typo in a preset file would otherwise surface only when a user runs it."""
    cfgs = load_all(name)
    assert isinstance(cfgs["prune"], PruneConfig) and isinstance(cfgs["sim"], SimConfig)
    # the resolved config written beside results reads back to the same dataclass
    for stage, cfg in cfgs.items():
        assert from_dict(stage, to_dict(cfg)) == cfg


def test_overrides_win_over_the_file():
    assert load_preset("quick", "prune", classes=[0], min_steps=777).min_steps == 777
    assert load_preset("quick", "prune", classes=[0], min_steps=None).min_steps == \
        load_preset("quick", "prune", classes=[0]).min_steps


def test_unknown_preset_fails_in_one_message():
    with pytest.raises(PapmError, match="unknown preset 'nope'"):
        load_preset("nope")


@pytest.mark.parametrize("text, message", [
    ("[prune]\nmin_step = 10\n", r"unknown key\(s\) \['min_step'\]"),
    ("[prunes]\n", "unknown table"),
    ("[prune\n", "not valid TOML"),
    ('[fuse]\nprior = "mean"\n', r"prior in \[fuse\] of .*bad.toml must be one of owner, none"),
    ("[fuse]\nmin_gain_z = -1\n", r"min_gain_z in \[fuse\] of .*bad.toml must be >= 0, got -1"),
    ("[prune]\nalpha = 2.0\n", r"^alpha in \[prune\] of .*bad.toml must lie in \[0, 1\], got 2.0$"),
    ('[train]\nprecision = "fp16"\n', r"^precision in \[train\] of .*bad.toml must be one of"),
])
def test_bad_presets_fail_in_one_message(tmp_path, text, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(PapmError, match=message):
        load_all(str(bad))


def test_a_bad_value_names_where_it_came_from():
    """The same bad value is named as the --set key, the flag or the preset key it came from."""
    from papm_core.config import load_preset

    with pytest.raises(PapmError, match=r"^--set prune.alpha must lie in \[0, 1\], got 3.0$"):
        load_preset("quick", "prune", {"alpha": "--set prune.alpha"}, classes=[0], alpha=3.0)
    with pytest.raises(PapmError, match=r"^--alpha must lie in \[0, 1\], got 3.0$"):
        load_preset("quick", "prune", classes=[0], alpha=3.0)


def test_requires_python_admits_only_what_flwr_supports():
    """`flwr run .` resolves the app with uv, which fails (exit 608) when the app admits a
    Python that one of its dependencies refuses."""
    import tomllib
    from importlib.metadata import metadata
    from pathlib import Path

    from packaging.specifiers import SpecifierSet

    ours = SpecifierSet(tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
                        ["project"]["requires-python"])
    flwr = SpecifierSet(metadata("flwr")["Requires-Python"])
    versions = [f"3.{minor}" for minor in range(8, 20)]
    admitted = [v for v in versions if v in ours]
    assert admitted, "requires-python admits no Python at all"
    assert [v for v in admitted if v not in flwr] == []


def test_the_code_passes_its_linter():
    """`ruff check .` with the rules in pyproject.toml ([tool.ruff]) finds nothing."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("ruff", reason="ruff comes with the test extra: pip install -e .[test]")
    root = Path(__file__).parents[1]
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]


def test_the_run_config_is_read_once_into_its_typed_object():
    """clients.runconfig.RunConfig holds exactly pyproject's [tool.flwr.app.config] keys with
    the same defaults; values are converted to the field's type; a bad key or value is one line."""
    import tomllib
    from pathlib import Path

    from clients.runconfig import RunConfig

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    assert RunConfig.read(declared) == RunConfig()  # same keys, same defaults
    run = RunConfig.read({"devices": "5", "test-delay-s": 2, "engine": "deployment: x"})
    assert run.devices == 5 and run.test_delay_s == 2.0 and not run.simulated and run.by_flwr
    with pytest.raises(PapmError, match=r"unknown run-config keys \['device'\]"):
        RunConfig.read({"device": 3})
    with pytest.raises(PapmError, match="run-config key devices = 'many': expected int"):
        RunConfig.read({"devices": "many"})
