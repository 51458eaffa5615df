"""Run markers: a run sees other live papm runs on the machine, forgets killed ones, and the
report says when timings shared the machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from papm_core import neighbours
from papm_core.neighbours import Watch, other_runs, run_marker
from papm_core.report import shared_machine_note
from papm_core.util import torch_threads

ROOT = Path(__file__).resolve().parents[1]
HOLDER = ("import sys, time\nfrom papm_core.neighbours import run_marker\n"
          "with run_marker(sys.argv[1]):\n    print('ready', flush=True)\n    time.sleep(120)\n")


def _holder(label: str, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, label], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_other_runs_sees_live_runs_and_forgets_killed_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPM_RUNS_DIR", str(tmp_path))
    env = {**os.environ, "PAPM_RUNS_DIR": str(tmp_path)}
    a, b = _holder("runs/a", env), _holder("runs/b", env)
    try:
        assert sorted(other_runs()) == ["runs/a", "runs/b"]
        assert other_runs("runs/a") == ["runs/b"]  # a run does not count itself
        with run_marker("runs/me"):
            assert sorted(other_runs("runs/me")) == ["runs/a", "runs/b"]
            watch = Watch("runs/me", every_s=3600)
            watch.poll(force=True)
            a.send_signal(signal.SIGKILL)  # no clean-up code runs: the kernel drops its lock
            a.wait(timeout=30)
            watch.poll()  # rate-limited: sees nothing new, forgets nothing
            assert watch.seen == {"runs/a", "runs/b"}
            monkeypatch.setattr(neighbours, "STALE_AFTER_S", 0.0)
            assert other_runs("runs/me") == ["runs/b"]
        assert sorted(p.name for p in tmp_path.glob("*.run")) == [f"{b.pid}.run"]  # a's stale, mine gone
    finally:
        for p in (a, b):
            p.kill()
            p.wait(timeout=30)
    assert other_runs() == []


def test_report_names_device_counts_that_shared_the_machine():
    quiet = {"2": {"wall_s": 1.0, "other_runs": []}, "base_train_s": 3.0}
    assert shared_machine_note(quiet, {"other_runs": []}) == ""
    assert shared_machine_note({"2": {"wall_s": 1.0}}, {}) == ""  # timings from before markers
    busy = {**quiet, "3": {"wall_s": 1.0, "other_runs": ["runs/x"]}}
    note = shared_machine_note(busy, {"other_runs": []})
    assert "N = 3" in note and "runs/x" in note and "N = 2" not in note and "base" not in note
    note = shared_machine_note(quiet, {"other_runs": ["runs/y"]})
    assert "base model's timing" in note and "runs/y" in note and "N =" not in note


def test_latency_keeps_the_quietest_block():
    """A burst of load during one 200-run block (here: the first 200 calls sleep 2 ms) does
    not reach the reported latency; every block's median is kept beside it."""
    import time

    from papm_core.evaluate import quietest_median_ms

    calls = []

    def call():
        calls.append(1)
        if len(calls) <= 200:
            time.sleep(0.002)

    r = quietest_median_ms(call, runs=200, blocks=3)
    assert len(calls) == 600 and r["runs"] == 200 and len(r["block_medians_ms"]) == 3
    assert r["block_medians_ms"][0] >= 2.0 and r["median_ms"] < 1.0
    assert r["median_ms"] == min(r["block_medians_ms"])


def test_latency_is_timed_once_per_model_and_thread_count(tmp_path, monkeypatch):
    """A model reused by several device counts is timed once on its node; another thread
    count or an unreadable record times it again."""
    import torch

    from papm_core import node

    timed = []
    monkeypatch.setattr(node, "latency_ms", lambda m, runs: timed.append(runs) or {
        "median_ms": 1.0 + len(timed), "p90_ms": 2.0, "threads": torch.get_num_threads()})
    model = torch.nn.Linear(2, 2)
    first = node.cached_latency(model, "ab" * 32, tmp_path)
    again = node.cached_latency(model, "ab" * 32, tmp_path)
    assert timed == [200] and not first["reused"] and again["reused"]
    assert again["median_ms"] == first["median_ms"] == 2.0
    threads = torch.get_num_threads()
    with torch_threads(threads + 1):
        assert not node.cached_latency(model, "ab" * 32, tmp_path)["reused"]
    next(tmp_path.glob(f"latency/*-t{threads}-*.json")).write_text("{")  # torn: timed again
    assert len(timed) == 2
    node.cached_latency(model, "ab" * 32, tmp_path)
    assert len(timed) == 3
