"""The run report covers every device count finished in its folder with the same settings,
not only those of the latest ``sim.py`` invocation."""

from __future__ import annotations

import json
from pathlib import Path

from papm_core.report import load_results


def _cfg(lr: float = 0.2, classes=(0,), devices: str = "2") -> dict:
    return {"train": {"width": 0.25}, "prune": {"lr": lr, "classes": list(classes)},
            "fuse": {"patience": 10}, "sim": {"devices": devices}}


def _write(out: Path, n: int, cfg: dict) -> None:
    (out / f"n{n}").mkdir(parents=True)
    (out / f"n{n}" / "result.json").write_text(json.dumps({"devices": n, "config": cfg}))


def test_report_keeps_earlier_device_counts_with_the_same_settings(tmp_path):
    now = _cfg(devices="5")
    _write(tmp_path, 10, _cfg(classes=[3], devices="10"))  # earlier invocation, same settings
    _write(tmp_path, 5, now)
    _write(tmp_path, 3, _cfg(lr=0.1, devices="3"))          # left by a --force run with other settings
    (tmp_path / "nx").mkdir()                                 # not a device-count folder
    (tmp_path / "n7").mkdir()                                 # unfinished: no result.json
    assert list(load_results(tmp_path, [5], now)) == [5, 10]
    assert list(load_results(tmp_path, [3, 5], now)) == [3, 5, 10]  # asked for: always shown
    assert list(load_results(tmp_path, [5])) == [5]                  # no settings: only those asked


def test_a_result_made_with_other_settings_is_not_finished(tmp_path):
    """After ``--force`` with new settings, device counts it did not redo still hold results
    of the old settings; a later run must redo them, not report them as its own."""
    import sim

    _write(tmp_path, 3, _cfg(lr=0.1, classes=[2, 3]))
    _write(tmp_path, 4, _cfg(classes=[2, 3], devices="4"))
    now = _cfg(devices="2-10")
    assert not sim.finished(tmp_path / "n3" / "result.json", now)
    assert sim.finished(tmp_path / "n4" / "result.json", now)
    assert not sim.finished(tmp_path / "n5" / "result.json", now)  # never run


def test_the_follow_hint_names_this_tries_run_only(tmp_path):
    """A rerun appends to the N's Flower log: the hint names the run started after ``start``,
    never an earlier try's, and waits while Flower has not named it yet."""
    import sim

    log = tmp_path / "flower.log"
    log.write_text("INFO : Successfully started run 111\n...killed\n")
    start = log.stat().st_size
    assert sim.follow_hint(3, ("FLWR_HOME=/r/.flwr flwr", ""), log, start) == ""
    with open(log, "a") as f:
        f.write("INFO : Starting run\nINFO : Successfully started run 222\n")
    hint = sim.follow_hint(3, ("FLWR_HOME=/r/.flwr flwr", ""), log, start)
    assert hint.startswith("sim.py: N=3: Flower run 222; ") and "`FLWR_HOME=/r/.flwr flwr log 222 --stream`" in hint
    far = sim.follow_hint(3, ("flwr", "boxes"), log, start)  # a federation someone else runs
    assert "`flwr log 222 boxes --stream`" in far and "`flwr stop 222 boxes`" in far
