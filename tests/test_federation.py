"""The Flower federation: message checks, class dealing, grouping, and sim.py end to end
on Flower's simulation runtime (smoke preset): `flwr run .` with non-IID holdings, a kill, a
failed run and a clean rerun in one folder, bad configs, and no Flower/Ray process left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, call_main, flower_processes, run_sim, write_tree

from papm_core.neighbours import run_marker

pytest.importorskip("flwr")


# --- fast: messages, dealing, matching -----------------------------------------------------
def test_wire_rejects_malformed_messages(monkeypatch):
    from clients import wire
    from papm_core.models import build_model, resnet18_spec

    ok = wire.pack({"key": "k"}, {"test_x": np.zeros((4, 3, 32, 32), np.uint8)})
    assert wire.images(ok, "test").shape == (4, 3, 32, 32)
    bad_dtype = wire.pack({"key": "k"}, {"test_x": np.zeros((4, 3, 32, 32), np.float32)})
    bad_shape = wire.pack({"key": "k"}, {"test_x": np.zeros((4, 32, 32), np.uint8)})
    for content, what in ((bad_dtype, "dtype"), (bad_shape, "shape")):
        with pytest.raises(wire.WireError, match=what):
            wire.images(content, "test")
    with pytest.raises(wire.WireError, match="lacks array"):
        wire.images(wire.pack({"key": "k"}), "test")
    with pytest.raises(wire.WireError, match="lacks key"):
        wire.config_of(wire.pack({"other": 1}), ("key",))
    with monkeypatch.context() as mp:
        mp.setattr(wire, "MAX_ARRAY_BYTES", 1000)
        with pytest.raises(wire.WireError, match="exceeds"):
            wire.images(ok, "test")
    # a model survives the trip exactly; a wrong spec is one WireError, not a crash
    torch.manual_seed(0)
    model = build_model(resnet18_spec(0.125)).eval()
    content = wire.pack({"spec": model.spec}, wire.model_arrays(model))
    back = wire.model_from(content, model.spec)
    xb = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(xb), back(xb))
    with pytest.raises(wire.WireError, match="shape"):
        wire.model_from(content, resnet18_spec(0.25))


def test_client_mods_time_every_reply_and_inject_only_the_asked_fault():
    """compute_time adds the handler's own seconds to a reply's config; test_faults fails the
    named simulated node in the named round only (or delays it), and nothing otherwise."""
    from types import SimpleNamespace

    from flwr.app import Context, RecordDict

    from clients import wire
    from clients.mods import compute_time, test_faults

    msg = SimpleNamespace(metadata=SimpleNamespace(message_type="query.stats"))

    def handler(m, ctx):
        time.sleep(0.05)
        content = wire.pack({"name": "node-0"})
        return SimpleNamespace(content=content, has_content=lambda: True)

    def ctx(partition, **rc):
        return Context(run_id=1, node_id=1, node_config={"partition-id": partition, "num-partitions": 2},
                       state=RecordDict(), run_config=rc)

    cfg = wire.config_of(compute_time(msg, ctx(0), handler).content)
    assert cfg["name"] == "node-0" and 0.05 <= cfg["compute_s"] < 1.0
    with pytest.raises(RuntimeError, match="injected failure in round stats"):
        test_faults(msg, ctx(0, **{"test-fail-partition": 0, "test-fail-round": "stats"}), handler)
    for other in (ctx(1, **{"test-fail-partition": 0, "test-fail-round": "stats"}),   # another node
                  ctx(0, **{"test-fail-partition": 0, "test-fail-round": "prune"})):  # another round
        assert test_faults(msg, other, handler).has_content()
    t0 = time.perf_counter()  # a slow node instead of a failing one
    test_faults(msg, ctx(0, **{"test-fail-partition": -2, "test-fail-round": "stats", "test-delay-s": 0.3}), handler)
    assert time.perf_counter() - t0 >= 0.3


def test_classes_dealt_once_and_grouping_independent_of_deal(cifar, tmp_path):
    from papm_core.grouping import group_classes, merge_stats
    from papm_core.models import build_model, resnet18_spec
    from papm_core.node import local_stats
    from papm_core.nodedata import held_classes, local_data

    for n in (2, 3, 7, 10):
        for seed in (0, 5):
            dealt = [held_classes(10, i, n, seed) for i in range(n)]
            assert sorted(c for d in dealt for c in d) == list(range(10))
    assert held_classes(10, 0, 3, 0) != held_classes(10, 0, 3, 5)
    torch.manual_seed(0)
    base = build_model(resnet18_spec(0.125)).eval()
    split = {"val_size": 500, "seed": 0, "per_class": 0, "ref_size": 500, "node_val": 0.1}
    source = str(cifar.source)
    groupings, stats = [], []
    for n, seed in ((3, 0), (3, 5), (4, 1)):
        parts = [local_stats(base, local_data(source, split, held_classes(10, i, n, seed)),
                             held_classes(10, i, n, seed)) for i in range(n)]
        merged = merge_stats(parts)
        stats.append(merged)
        groupings.append({k: group_classes(merged, k) for k in (2, 3, 5)})
    for spec in ("dirichlet:0.5", "classes:3"):  # non-IID holdings: each node's stats, all its images
        parts = []
        for i in range(4):
            data = local_data(source, split, None, (spec, i, 4, 0))
            present = sorted(set(data.val.y.unique().tolist()))
            parts.append(local_stats(base, local_data(source, split, present, (spec, i, 4, 0)), present))
        merged = merge_stats(parts)
        assert np.allclose(merged.outer_sum, stats[0].outer_sum) and np.array_equal(merged.count, stats[0].count)
        groupings.append({k: group_classes(merged, k) for k in (2, 3, 5)})
    assert all(g == groupings[0] for g in groupings)
    assert np.allclose(stats[0].outer_sum, stats[1].outer_sum)
    from papm_core.specialize import reference_splits
    # the nodes' own held-out images, all of them, once: never the server's validation split
    assert stats[0].count.sum() == len(reference_splits(cifar, split).node_val) == 4900
    _stats_reused_across_device_counts(stats[0], tmp_path)


def _stats_reused_across_device_counts(merged, tmp_path):
    """A later N of a simulation groups from the statistics an earlier N uploaded (saved as
    JSON, read back exactly); another base or split ignores them; a retried N keeps its own."""
    from papm_core.config import SimConfig
    from papm_core.grouping import group_classes, similarity
    from papm_core.util import write_json
    from server.app import cached_grouping

    key = {"base_sha256": "abc", "split": {"seed": 0}, "data": "d"}
    write_json(tmp_path / "class_stats.json", {"key": key, "stats": merged.to_dict()})
    for k in (2, 3, 5):
        got = cached_grouping(tmp_path / f"n{k}", tmp_path / "class_stats.json", key, k, SimConfig(), 10)
        assert got["groups"] == group_classes(merged, k)
        assert np.array_equal(got["similarity"], similarity(merged))
    other = {**key, "base_sha256": "def"}
    assert cached_grouping(tmp_path / "n2", tmp_path / "class_stats.json", other, 2, SimConfig(), 10) is None
    assert cached_grouping(tmp_path / "n2", None, key, 2, SimConfig(), 10) is None  # real boxes: always upload
    from server.app import grouping_key
    done = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]  # an interrupted try's complete grouping is reused
    write_json(tmp_path / "n2" / "grouping.json", {"key": grouping_key(key, SimConfig()), "groups": done,
                                                   "complete": True, "similarity": []})
    retried = cached_grouping(tmp_path / "n2", tmp_path / "class_stats.json", key, 2, SimConfig(), 10)
    assert retried["groups"] == done


def test_match_groups_for_boxes_and_simulation():
    from papm_core.federation import match_groups

    assert match_groups([[0, 1], [2]], None) == [0, 1]
    # box 0 holds class 2, box 1 holds 0 and 1: each group goes to the box with its classes
    assert match_groups([[0, 1], [2]], [{2: 1}, {0: 1, 1: 1}]) == [1, 0]
    # non-IID holdings: both nodes hold every class; a group goes where most of its images are
    assert match_groups([[0, 1], [2]], [{0: 90, 1: 80, 2: 10}, {0: 10, 1: 20, 2: 5}]) == [0, 1]
    assert match_groups([[0, 1], [2]], [{0: 10, 1: 20, 2: 5}, {0: 90, 1: 80, 2: 10}]) == [1, 0]


def test_holdings_partition_every_image_once_and_fail_early():
    from papm_core.holdings import check, part, shares
    from papm_core.util import PapmError

    y = torch.arange(10).repeat_interleave(37)[torch.randperm(370, generator=torch.Generator().manual_seed(1))]
    for spec, nodes in (("dirichlet:0.5", 4), ("dirichlet:100", 3), ("classes:2", 5), ("classes:3", 4)):
        p = shares(spec, nodes, 10, seed=0)
        assert p.shape == (10, nodes) and np.allclose(p.sum(1), 1)
        assert np.array_equal(p, shares(spec, nodes, 10, seed=0)) and not np.array_equal(p, shares(spec, nodes, 10, 1))
        parts = [part(y, p, i, seed=0) for i in range(nodes)]
        idx = torch.cat(parts)
        assert sorted(idx.tolist()) == list(range(370))  # disjoint, and every image held
        held = [sorted(set(y[q].tolist())) for q in parts]
        if spec.startswith("classes"):
            assert all(len(h) == int(spec[-1]) for h in held)
    assert shares("classes:2", 1, 10, 0).tolist() == [[1.0]] * 10  # N = 1 holds everything
    even = shares("dirichlet:100", 3, 10, seed=0)  # large A: nearly IID
    assert np.abs(even - 1 / 3).max() < 0.15
    for spec, nodes, what in (("classes:2", 4, "K >= 3"), ("classes:11", 2, "has 10"),
                              ("dirichlet:0", 2, "out of range"), ("dirichlet", 2, "not understood"),
                              ("iid", 2, "not understood"), ("classes:1.5", 10, "out of range")):
        with pytest.raises(PapmError, match=what):
            check(spec, nodes, 10)


def test_latency_is_timed_alone_on_a_shared_machine(tmp_path):
    """A node's latency timing (exclusive) waits for other nodes' work (shared), and a
    shared holder does not block another shared holder."""
    from papm_core.node import machine_lock

    probe = ("import fcntl, sys; fh = open(sys.argv[1], 'a'); "
             "flag = fcntl.LOCK_EX if sys.argv[2] == 'ex' else fcntl.LOCK_SH\n"
             "try: fcntl.flock(fh, flag | fcntl.LOCK_NB); print('got')\n"
             "except BlockingIOError: print('blocked')")

    def other(mode: str) -> str:
        r = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "machine.lock"), mode],
                           capture_output=True, text=True, timeout=60)
        return r.stdout.strip()

    with machine_lock(tmp_path, exclusive=False):
        assert other("ex") == "blocked" and other("sh") == "got"
    with machine_lock(tmp_path, exclusive=True):
        assert other("sh") == "blocked"
    assert other("ex") == "got"


def test_bad_configs_get_one_line_errors(shared_archive, tmp_path, monkeypatch):
    """sim.py's main, in this process (as ``python sim.py`` calls it), stops each bad config
    before any work with one line and exit code 2."""
    sys.path.insert(0, str(ROOT))
    import sim

    monkeypatch.setattr(sim.signal, "signal", lambda *a: None)  # this process keeps its SIGTERM handler
    for args, msg in ((["--set", "prune.bogus=1"], "unknown key"),
                      (["--devices", "0-3"], "outside [1, 10]"),
                      (["--devices", "11"], "outside [1, 10]"),
                      (["--preset", "nope"], "unknown preset"),
                      (["--set", "noequals"], "STAGE.KEY=VALUE"),
                      (["--devices", "2", "--set", "sim.holdings=classes:2"], "use K >= 5"),
                      (["--set", "sim.holdings=iid"], "holdings 'iid' is not understood"),
                      (["--set", "sim.budgets=0.5,fast"], "sim.budgets = 'fast': expected a parameter"),
                      (["--set", "sim.budgets=0.5", "--set", "sim.fleet_budget=1.0x"], "not both"),
                      (["--set", "prune.alpha=2"], "--set prune.alpha must lie in [0, 1], got 2")):
        r = call_main(sim.main, ["sim.py", "--no-progress", "--preset", "smoke", "--data", str(shared_archive),
                                 "--out", str(tmp_path / "bad"), *args])
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sim.py: error:") and msg in lines[0], r.stderr
    assert not (tmp_path / "bad" / "n2").exists()


# --- slow: the real simulation runtime -------------------------------------------------------
@pytest.mark.slow
def test_smoke_run_end_to_end(smoke_run):
    out, seconds = smoke_run
    assert seconds < 400  # the preset's budget is 3 minutes on 2 idle cores
    for name in ("REPORT.md", "fusion.csv", "devices.csv", "baseline.csv", "accuracy_vs_n.png",
                 "size_latency_vs_n.png", "similarity.png", "config.json", "timings.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "REPORT.md").read_text()
    for section in ("## Baseline", "## Fusion by device count", "## Per-device pruning effect",
                    "## Wall time", "## Provenance", "original best %", "Distinct pruned models built"):
        assert section in report
    for section in ("best single device", "specialisation gain", "quietest block", "| 1 | complete |"):
        assert section in report, section  # the fleet against its own members, the timing method
    assert "best acc %" not in report  # no figure is a maximum over test
    header = (out / "devices.csv").read_text().splitlines()[0]
    assert "latency block medians ms" in header and "latency reused" in header
    for n in (1, 3):  # N = 1 is always run: one device model for every class
        res = json.loads((out / f"n{n}" / "result.json").read_text())
        assert len(res["groups"]) == n and sorted(c for g in res["groups"] for c in g) == list(range(10))
        assert res["missing"] == [] and res["incomplete"] == []
        assert res["fusion"]["test_acc"] > 12.0  # above chance (10 %) on 1,000 test images
        assert res["fusion"]["missing_one_worst"] is not None or n == 1
        f = res["fusion"]  # the seeds' spread is of heads as kept (gated), the picked one among them
        assert f["seed_test_acc"][f["head_seed"] - res["config"]["prune"]["seed"]] == pytest.approx(f["test_acc"])
        fleet = res["fleet"]
        best = max(res["per_device"], key=lambda d: (d["val_acc"], -d["device"]))
        assert fleet["best_single_device"] == best["device"]
        assert fleet["best_single_test_acc"] == pytest.approx(best["test_acc"], abs=1e-4)
        for d in res["per_device"]:
            assert d["reduction"] >= 0.77 and d["latency_ms"] > 0 and d["params"] > 0
        assert res["provenance"]["git_commit"] and res["config"]["prune"]["seed"] == 0
    base = json.loads((out / "base_eval.json").read_text())  # timed like the simulated devices
    assert base["threads_matched"] and base["threads"] == os.cpu_count() and "torch thread" in report
    assert base["other_runs"] == [] and "not a quiet machine" not in report
    assert flower_processes(out) == []


@pytest.mark.slow
def test_the_user_sees_precision_how_to_follow_each_run_and_no_test_figure(smoke_run):
    """sim.py's first line names the precision each stage resolved; for every device count it
    names the Flower run and the command that follows it; its per-N lines show validation only."""
    out, _ = smoke_run
    lines = (out.parent / "sim.stdout").read_text().splitlines()
    assert lines[0].startswith("sim.py: base training precision ") and "device fine-tuning precision fp32" in lines[0]
    for n in (1, 3):
        log = (out / f"n{n}" / "flower.log").read_text()
        rid = re.findall(r"Successfully started run (\d+)", log)[-1]
        hint = [ln for ln in lines if ln.startswith(f"sim.py: N={n}: Flower run {rid}; follow it with ")]
        assert len(hint) == 1 and f"`FLWR_HOME={out / '.flwr'} flwr log {rid} --stream`" in hint[0], lines
        done = [ln for ln in lines if ln.startswith(f"N={n}: fused head ")]
        assert len(done) == 1 and "on its selection half of validation" in done[0] and "test" not in done[0]


@pytest.mark.slow
def test_flwr_run_with_non_iid_holdings_and_budgets_writes_the_report(smoke_run, tmp_path, shared_archive):
    """Flower's own CLI, as its docs say (`flwr run .` with --run-config and --federation-config),
    claims the run folder, trains and writes the same REPORT.md, CSVs and plots as sim.py.
    The run is non-IID with two budgets: under classes:5 each of the 2 simulated nodes holds
    5 classes of its own, the groups go to the nodes by the images they hold and each trains
    on what it holds; sim.budgets gives the two devices two sizes."""
    out, home = tmp_path / "run", tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    rc = (f'devices=2 preset="smoke" out="{out}" data="{shared_archive}" base="{smoke_run[0] / "base.pt"}" '
          'holdings="classes:5" budgets="0.5, 0.9"')
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", ".", "--run-config", rc,
           "--federation-config", "num-supernodes=2", "--stream"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    finally:  # flwr run leaves a local SuperLink running: stop what this FLWR_HOME started, and wait
        for line in flower_processes(out, home):
            try:
                os.kill(int(line.split()[0]), signal.SIGTERM)
            except ProcessLookupError:
                pass
        t0 = time.monotonic()
        while flower_processes(out, home) and time.monotonic() - t0 < 30:
            time.sleep(0.5)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert f"results and REPORT.md go to {out}" in r.stdout + r.stderr
    for name in ("REPORT.md", "fusion.csv", "devices.csv", "accuracy_vs_n.png", "config.json", "timings.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "n2" / "result.json").read_text())
    assert len(res["groups"]) == 2 and res["missing"] == [] and res["incomplete"] == []
    report = (out / "REPORT.md").read_text()
    assert "| 2 | complete |" in report and "Node holdings: **classes:5**" in report
    rows = (out / "fusion.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("2,complete,")
    # the holdings: the nodes' statistics, merged, are the whole data's, so the grouping is
    # the central one; then each group goes to the node holding most of its images
    from papm_core.grouping import run_grouping
    central = run_grouping(str(smoke_run[0] / "base.pt"), [2], str(shared_archive), out_dir=str(tmp_path / "g"),
                           ref_size=200)
    assert sorted(res["groups"]) == sorted(central["groups"]["2"])
    assert res["holdings"] == ["classes:5"]
    devs = res["per_device"]
    assert all(len(d["held"]) == 5 for d in devs)
    assert sorted(c for d in devs for c in d["held"]) == list(range(10))  # every class, once
    # each trains on every image it holds of its group's classes, and on nothing else (the
    # smoke run's N = 1 node held all 10 classes, the same number of images of each)
    per_class = json.loads((smoke_run[0] / "n1" / "result.json").read_text())["per_device"][0]["images"] / 10
    for d in devs:
        assert d["not_held"] == [c for c in d["classes"] if c not in d["held"]]
        assert d["images"] == per_class * len(set(d["classes"]) & set(d["held"])) > 0
    # each group went to the node holding more of its classes (images split evenly here)
    overlap = [len(set(d["classes"]) & set(d["held"])) for d in devs]
    swapped = [len(set(devs[1 - i]["classes"]) & set(d["held"])) for i, d in enumerate(devs)]
    assert sum(overlap) >= sum(swapped)
    # the budgets
    assert [d["budget"] for d in devs] == ["0.5", "0.9"]
    assert 0.5 <= devs[0]["reduction"] <= 0.505 and 0.9 <= devs[1]["reduction"] <= 0.905
    assert devs[0]["params"] > 4 * devs[1]["params"] and devs[0]["file_mb"] > devs[1]["file_mb"]
    assert all(d["runtime"] == "torch" for d in devs)
    csv = (out / "devices.csv").read_text().splitlines()
    assert "budget" in csv[0].split(",") and len(csv) == 1 + 2  # header, N = 2's two devices


@pytest.mark.slow
def test_federated_grouping_equals_papm_group(smoke_run, tmp_path, shared_archive):
    """The smoke run's N = 3 grouping, from the nodes' uploaded class statistics, is what
    `papm group` computes centrally (the flwr run test checks N = 2 under non-IID holdings)."""
    from papm_core.grouping import run_grouping

    out, _ = smoke_run
    central = run_grouping(str(out / "base.pt"), [3], str(shared_archive), out_dir=str(tmp_path), ref_size=200)
    fed = json.loads((out / "n3" / "grouping.json").read_text())
    assert fed["groups"] == central["groups"]["3"]
    assert np.allclose(fed["similarity"], central["similarity"], atol=1e-9)


def _carry_over_n1(smoke: Path, run: Path) -> None:
    """A run folder that already holds the smoke run's finished N = 1 (same base, preset and
    data), as one left by an interrupted run: sim.py carries on with what is missing."""
    run.mkdir(parents=True)
    shutil.copy2(smoke / "config.json", run / "config.json")
    shutil.copytree(smoke / "n1", run / "n1")
    timings = json.loads((smoke / "timings.json").read_text())
    (run / "timings.json").write_text(json.dumps({"1": timings["1"]}))


@pytest.mark.slow
def test_a_kill_then_a_failed_run_then_a_clean_rerun(smoke_run, tmp_path, shared_archive):
    """One run folder through three invocations of sim.py at N = 3 (N = 1 carried over from
    the smoke run): killed inside the prune round after a node saved its model; rerun with
    every node failing the stats round, which stops at once with one line and nothing left
    running; rerun clean beside another papm run, which reuses the saved model untouched and
    gives exactly the smoke run's groups and figures, with the neighbour noted. (A single
    failing node, masked and named: tests/test_honest.py and the deployment test.)"""
    out, _ = smoke_run
    run = tmp_path / "faults"
    _carry_over_n1(out, run)
    args = ["--preset", "smoke", "--data", str(shared_archive), "--out", str(run), "--base", str(out / "base.pt")]
    # 1. node-1 sleeps 60 s in the prune round, so the kill lands after another node saved its model
    env = {**os.environ, "PAPM_TEST_FAIL_PARTITION": "1", "PAPM_TEST_DELAY_S": "60"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "sim.py"), "--no-progress", *args], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = run / "store" / "pruned"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300 and not any(store.glob("*.pt")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in store.glob("*.pt")}
    assert 1 <= len(kept) <= 2, "the kill should land inside the prune round"
    assert not (run / "n3" / "result.json").exists()
    # 2. every node fails the stats round (the rerun first stops what the killed run left)
    r = run_sim(*args, env={"PAPM_TEST_FAIL_PARTITION": "all", "PAPM_TEST_FAIL_ROUND": "stats"})
    assert r.returncode == 2
    assert "no node answered the stats round" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (run / "n3" / "result.json").exists() and flower_processes(run) == []
    # 3. a clean rerun, beside another papm run on this machine (its load is in the timings),
    # redoes N = 3, reusing the models saved before the kill as they were, and gives exactly
    # the uninterrupted smoke run's groups and figures
    with run_marker("runs/neighbour"):
        r = run_sim(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "other papm runs are active on this machine (runs/neighbour)" in r.stderr
    assert json.loads((run / "timings.json").read_text())["3"]["other_runs"] == ["runs/neighbour"]
    assert {p.name: p.stat().st_mtime_ns for p in store.glob("*.pt") if p.name in kept} == kept
    res, ref = (json.loads((d / "n3" / "result.json").read_text()) for d in (run, out))
    assert sorted(d["reused"] for d in res["per_device"]) == [False] * (3 - len(kept)) + [True] * len(kept)
    assert all(d["reused"] == (f"{d['key']}.pt" in kept) for d in res["per_device"])
    assert res["groups"] == ref["groups"] and res["missing"] == [] and res["incomplete"] == []
    assert res["fusion"]["test_acc"] == ref["fusion"]["test_acc"]
    assert [d["test_acc"] for d in res["per_device"]] == [d["test_acc"] for d in ref["per_device"]]
    report = (run / "REPORT.md").read_text()
    assert "Caveat: not a quiet machine" in report and "| 1 | complete |" in report and "| 3 | complete |" in report
    assert flower_processes(run) == []


def test_run_folder_with_other_data_is_refused(tmp_path):
    """A run folder made with one data set is never mixed with another's results: sim.py
    refuses it with one line naming --force or another --out, and leaves it as it was."""
    sys.path.insert(0, str(ROOT))
    import sim

    a = write_tree(tmp_path / "a", per_split=(30, 3))
    b = write_tree(tmp_path / "b", per_split=(31, 3))  # same classes, other images
    out = tmp_path / "run"
    cfg, devices, _ = sim.resolve(sim.parse_args(["--preset", "smoke", "--data", str(a), "--out", str(out)]))
    assert devices[0] == 1 and cfg["data"]["fingerprint"]
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    before = (out / "config.json").read_bytes()
    r = run_sim("--preset", "smoke", "--data", b, "--out", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "data.fingerprint" in r.stderr and "--force" in r.stderr and "--out" in r.stderr
    assert (out / "config.json").read_bytes() == before


def test_fine_tuning_takes_the_cores_no_other_client_uses(monkeypatch):
    """On 2 cores with one-core clients, N = 1 fine-tunes on both cores (train-threads 2)
    while latencies stay timed at the client's 1 thread; N >= 2 keeps one thread each."""
    sys.path.insert(0, str(ROOT))
    import sim
    from clients.app import NodeSetup
    from clients.runconfig import RunConfig

    monkeypatch.setattr(sim.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(sim, "git_commit", lambda: "")
    args = sim.parse_args(["--preset", "quick"])
    cfg = {"sim": {"client_cpus": 1, "deal_seed": 0, "holdings": "group"}}
    rcs = {n: sim.run_config(n, Path("/tmp/x"), cfg, args) for n in (1, 2, 5)}
    assert [(rcs[n]["client-threads"], rcs[n]["train-threads"]) for n in (1, 2, 5)] == [(1, 2), (1, 1), (1, 1)]
    run = RunConfig.read(rcs[1])
    assert (run.client_threads, run.train_threads) == (1, 2)
    from flwr.app import Context, RecordDict

    from papm_core.util import torch_threads
    with torch_threads(torch.get_num_threads()):  # NodeSetup sets this process's threads
        node = NodeSetup(Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                                 state=RecordDict(), run_config=rcs[1]))
        assert node.train_threads == 2 and torch.get_num_threads() == 1
