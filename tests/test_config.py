"""Presets: every shipped file resolves to valid typed configs, and mistakes fail clearly.

Example: ``pytest tests/test_config.py -q``
"""

from __future__ import annotations

import pytest

from papm_core.config import (PRESET_DIR, PruneConfig, SimConfig, from_dict, load_all,
                              load_preset, to_dict)
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


def test_bad_presets_fail_in_one_message(tmp_path):
    with pytest.raises(PapmError, match="unknown preset 'nope'"):
        load_preset("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[prune]\nmin_step = 10\n")
    with pytest.raises(PapmError, match=r"unknown key\(s\) \['min_step'\]"):
        load_all(str(bad))
    bad.write_text("[prunes]\n")
    with pytest.raises(PapmError, match="unknown table"):
        load_all(str(bad))
    bad.write_text("[prune\n")
    with pytest.raises(PapmError, match="not valid TOML"):
        load_all(str(bad))
    bad.write_text('[fuse]\nprior = "mean"\n')
    with pytest.raises(PapmError, match="fusion prior must be one of owner, none"):
        load_all(str(bad))
    bad.write_text('[fuse]\nmin_gain_z = -1\n')
    with pytest.raises(PapmError, match="min_gain_z must be >= 0, got -1"):
        load_all(str(bad))
