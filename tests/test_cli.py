"""The papm command: bad input gets one line and a non-zero exit; eval prints its figures."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, write_tree

from papm_core.util import use_bf16


def _one_line_error(res):
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("papm: error:") and "Traceback" not in res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("tree") / "t", per_split=(20, 4))


def test_missing_path(tmp_path):
    line = _one_line_error(run_cli("train", "--data", tmp_path / "missing", "--epochs", 1))
    assert "does not exist" in line


def test_corrupt_archive(tmp_path):
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08" + b"\x00" * 50)
    line = _one_line_error(run_cli("train", "--data", bad, "--epochs", 1))
    assert "cannot read archive" in line


def test_tree_without_class_folders(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"")
    line = _one_line_error(run_cli("train", "--data", tmp_path / "imgs", "--epochs", 1))
    assert "no train/<class>/" in line


def test_truncated_checkpoint(tmp_path, tree):
    out = tmp_path / "m.pt"
    ok = run_cli("train", "--preset", "smoke", "--data", tree, "--epochs", 1, "--val-size", 6,
                 "--out", out, "--no-progress")
    assert ok.returncode == 0, ok.stderr
    data = out.read_bytes()
    (tmp_path / "t.pt").write_bytes(data[:1000])
    line = _one_line_error(run_cli("eval", tmp_path / "t.pt", "--data", tree))
    assert "corrupt, truncated" in line


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--batch-size", "-1"),
                                        ("--lr", "0"), ("--width", "-0.5")])
def test_bad_numbers(tree, flag, value):
    line = _one_line_error(run_cli("train", "--data", tree, flag, value))
    assert flag in line


def test_unknown_preset_and_flag(tree):
    assert "unknown preset" in _one_line_error(run_cli("train", "--preset", "nope"))
    assert "unrecognized arguments" in _one_line_error(run_cli("train", "--bogus"))


def test_train_then_eval(tmp_path, tree):
    out = tmp_path / "m.pt"
    res = run_cli("train", "--preset", "smoke", "--data", tree, "--epochs", 2, "--val-size", 6,
                  "--out", out, "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "epoch   2" in res.stdout and out.is_file()
    ran = "bf16" if use_bf16(torch.device("cpu")) else "fp32"
    assert res.stdout.startswith(f"papm train precision {ran} (auto: ")  # the first line says which ran
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["config"]["epochs"] == 2 and side["metrics"]["complete"] is True
    assert side["precision"]["resolved"] == ran
    ev = run_cli("eval", out, "--data", tree, "--json", tmp_path / "e.json", "--runs", 200)
    assert ev.returncode == 0, ev.stderr
    for word in ("cat", "dog", "emu", "params", "latency", "throughput"):
        assert word in ev.stdout
    figures = json.loads((tmp_path / "e.json").read_text())
    assert figures["latency"]["runs"] == 200 and figures["latency"]["median_ms"] > 0
    # the same model on the same test split as training's final report (another process)
    assert figures["params"] > 0 and figures["test_acc"] == pytest.approx(side["metrics"]["test_acc"], abs=1e-9)
