"""Flower's Deployment Engine on this machine: credentials, box data files, malformed
messages, TLS and SuperNode authentication against a real SuperLink, and ``sim.py
--deployment`` end to end (smoke preset) with a SuperNode shut down during the prune round
and another paused during the embed round; nothing is left running afterwards."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import flower_processes, fused_from_files, run_sim

from papm_core.util import PapmError

pytest.importorskip("flwr")


# --- fast ------------------------------------------------------------------------------------
def test_credentials_are_valid_private_and_kept(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from server.creds import make_node_key, make_tls

    tls = make_tls(tmp_path, ["server.lan", "127.0.0.1"])
    cert = x509.load_pem_x509_certificate(tls["server.pem"].read_bytes())
    ca = x509.load_pem_x509_certificate(tls["ca.crt"].read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the chain is wrong
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "server.lan" in san.get_values_for_type(x509.DNSName)
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    priv, pub = make_node_key(tmp_path, "box-0")
    key = load_ssh_private_key(priv.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(pub.read_bytes()).public_numbers() == key.public_key().public_numbers()
    for p in (priv, tls["server.key"], tls["ca.key"]):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    before = priv.read_bytes()
    assert make_node_key(tmp_path, "box-0")[0].read_bytes() == before  # a rerun keeps deployed keys


def test_box_data_file_roundtrip_and_rejects_bad_files(cifar, tmp_path):
    from papm_core.nodedata import box_classes, local_data, make_box, read_box

    meta = {"class_names": cifar.classes, "config": {"val_size": 200, "seed": 0, "per_class": 40}}
    path = make_box(tmp_path / "box.npz", meta, cifar.source, [3, 7], ref_size=50)
    box = read_box(str(path))
    assert box_classes(str(path)) == [3, 7] and box.classes == cifar.classes
    # exactly what a simulated node holding classes 3 and 7 reads (same carve, same order)
    sim = local_data(cifar.source, {"val_size": 200, "seed": 0, "per_class": 40, "ref_size": 50}, [3, 7])
    assert torch.equal(box.private.x, sim.private.x) and torch.equal(box.val.y, sim.val.y)
    good = dict(np.load(path))
    bad = {"missing": {k: v for k, v in good.items() if k != "val_y"},
           "dtype": {**good, "private_x": good["private_x"].astype(np.float32)},
           "labels": {**good, "val_y": good["val_y"] + 100},
           "pickle": {**good, "class_names": np.array([object()], dtype=object)}}
    for name, arrays in bad.items():
        p = tmp_path / f"{name}.npz"
        np.savez(p, **arrays)
        with pytest.raises(Exception) as e:
            read_box(str(p))
        assert type(e.value).__name__ == "PapmError" and "\n" not in str(e.value), name


def test_papm_shard_command(cifar, shared_archive, tmp_path):
    from helpers import run_cli

    from papm_core import checkpoint
    from papm_core.models import build_model, resnet18_spec
    from papm_core.nodedata import read_box

    base = tmp_path / "base.pt"
    checkpoint.save(base, build_model(resnet18_spec(0.125)), kind="base", class_names=cifar.classes,
                    config={"val_size": 200, "seed": 0, "per_class": 40})
    r = run_cli("shard", "--base", base, "--data", shared_archive, "--classes", 1, 4, "--ref-size", 50,
                "--out", tmp_path / "box.npz")
    assert r.returncode == 0, r.stderr
    box = read_box(str(tmp_path / "box.npz"))
    assert sorted(set(box.private.y.tolist())) == [1, 4] and "automobile, deer" in r.stdout
    assert sorted(set(box.val.y.tolist())) == [1, 4] and len(box.private) > 0
    for bad, msg in ((["--out", tmp_path / "box.pt"], "must end in .npz"),
                     (["--classes", 12, "--out", tmp_path / "b2.npz"], "unknown class ids")):
        r = run_cli("shard", "--base", base, "--data", shared_archive, "--ref-size", 50, *bad)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b2.npz").exists()


def test_client_handlers_reject_malformed_messages_and_keep_working(tmp_path, monkeypatch):
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clients import wire
    from clients.app import embed
    from papm_core.models import build_model, resnet18_spec

    ctx = Context(run_id=1, node_id=1, node_config={"name": "box-t", "data": str(tmp_path / "none.npz"),
                                                    "store": str(tmp_path / "store")},
                  state=RecordDict(), run_config={})
    for attr in ("_run_id", "_node_id", "_task_id"):  # what Flower's runtime sets for a ClientApp
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    imgs = {"ref_x": np.zeros((4, 3, 32, 32), np.uint8), "val_x": np.zeros((4, 3, 32, 32), np.uint8)}
    cases = {"missing key": wire.pack({}, imgs),
             "wrong dtype": wire.pack({"key": "k"}, {**imgs, "ref_x": imgs["ref_x"].astype(np.float64)}),
             "wrong shape": wire.pack({"key": "k"}, {**imgs, "val_x": np.zeros((4, 32, 32), np.uint8)}),
             "no model": wire.pack({"key": "k"}, imgs)}
    for what, content in cases.items():
        with pytest.raises(Exception) as e:  # Flower turns this into an error reply
            embed(Message(content, dst_node_id=1, message_type="query.embed"), ctx)
        assert type(e.value).__name__ in ("WireError", "PapmError"), what
    # the node still answers a valid message afterwards (a stored model, real embeddings)
    from papm_core import checkpoint
    from papm_core.node import _pruned_path
    torch.manual_seed(0)
    model = build_model(resnet18_spec(0.125)).eval()
    checkpoint.save(_pruned_path(tmp_path / "store", "k"), model, kind="pruned", class_names=list("abcdefghij"))
    rep = embed(Message(wire.pack({"key": "k"}, imgs), dst_node_id=1, message_type="query.embed"), ctx)
    feats = wire.array(rep.content, "ref_f", "float32", (4, None))
    # pooled features, then the model's 10 class log-probabilities
    assert feats.shape[1] == model.forward_features(torch.zeros(1, 3, 32, 32)).shape[1] + 10
    assert np.allclose(np.exp(feats[:, -10:]).sum(1), 1.0, atol=1e-5)


def test_server_masks_malformed_replies():
    from clients import wire
    from strategies.papm import PapmStrategy

    strat = PapmStrategy.__new__(PapmStrategy)
    strat.ds = SimpleNamespace(classes=list("abcdefghij"))
    parse = strat._parse_stats(identify_only=False)
    ident = {"name": "box-0", "partition": -1, "held": [0], "simulated": False}
    k = 10
    good = {"count": np.full(k, 2.0), "prob_sum": np.full((k, k), 0.2), "outer_sum": np.full((k, k, k), 0.02),
            "logit_sum": np.ones((k, k))}
    assert parse(0, SimpleNamespace(content=wire.pack(ident, good)))["stats"].count.shape == (k,)
    for bad in ({**good, "count": np.ones(k, np.float32)}, {**good, "outer_sum": np.ones((k, k))},
                {k2: v for k2, v in good.items() if k2 != "logit_sum"}):
        with pytest.raises(wire.WireError):
            parse(0, SimpleNamespace(content=wire.pack(ident, bad)))
    # right shapes, impossible values: NaN, a negative count, probability mass != count
    nan = {**good, "logit_sum": np.where(np.eye(k) > 0, np.nan, 1.0)}
    neg = {**good, "count": np.r_[-2.0, np.full(k - 1, 2.0)], "prob_sum": np.r_[np.full((1, k), -0.2),
                                                                                 np.full((k - 1, k), 0.2)]}
    mass = {**good, "count": np.full(k, 3.0)}
    for what, bad in (("non-finite", nan), ("negative", neg), ("do not match", mass)):
        with pytest.raises(PapmError, match=what):
            parse(0, SimpleNamespace(content=wire.pack(ident, bad)))


# --- a real SuperLink: TLS and SuperNode authentication -----------------------------------------
@pytest.mark.slow
def test_tls_and_supernode_auth_refuse_strangers(tmp_path):
    from server.deploy import Box, Deployment

    dep = Deployment(tmp_path, tmp_path / "creds")
    try:
        dep.start_superlink()
        assert "root-certificates" in (tmp_path / ".flwr" / "config.toml").read_text()
        dep.register("box-0")
        box = Box("box-0", tmp_path / "box.npz", tmp_path / "store")
        dep.start_node(box)
        from server.creds import make_node_key
        stranger = make_node_key(tmp_path / "other", "box-9")[0]  # a valid key nobody registered
        quick = lambda cmd: [{"20": "1", "60": "5"}.get(a, a) for a in cmd]  # noqa: E731 (give up fast)
        intruder = dep.start_node(Box("box-9", box.data, tmp_path / "s9"), quick(dep.node_cmd(box, key=stranger)))
        plain = dep.start_node(Box("plain", box.data, tmp_path / "sp"), quick(dep.node_cmd(box, tls=False)))
        t0 = time.monotonic()
        while not dep.online() and time.monotonic() - t0 < 60:
            time.sleep(0.5)
        assert len(dep.online()) == 1  # only the registered box
        for proc in (intruder, plain):
            proc.wait(timeout=120)  # both give up: refused, never connected
            assert proc.returncode != 0
        assert dep.superlink.poll() is None and len(dep.online()) == 1  # the federation is unaffected
        assert "Failed to activate SuperNode" in (tmp_path / "logs" / "box-9.log").read_text()
    finally:
        assert dep.stop() == 0
    assert flower_processes(tmp_path) == []


# --- sim.py --deployment end to end ----------------------------------------------------------------
def _deploy(out: Path, base: Path, archive: Path, devices: int, *extra: str, env=None):
    return run_sim("--deployment", "--preset", "smoke", "--data", archive, "--out", out, "--devices", devices,
                   "--base", base, *extra, env=env)


def _continue_when(out: Path, devices: int, rounds: tuple[str, ...], stop: threading.Event) -> None:
    """SIGCONT the run's stopped processes once the server of device count ``devices``
    moved on to one of ``rounds``."""
    while not stop.is_set():
        try:
            p = json.loads((out / "progress.json").read_text())
            if p.get("round") in rounds and p.get("devices") == devices:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" and \
                    f"FLWR_HOME={out / '.flwr'}".encode() in (d / "environ").read_bytes():
                os.kill(int(d.name), signal.SIGCONT)
        except (OSError, ValueError):
            continue


@pytest.mark.slow
def test_deployment_matches_simulation_and_survives_a_lost_and_a_paused_box(smoke_run, tmp_path, shared_archive):
    """One `sim.py --deployment` run (per device count a real SuperLink with TLS and SuperNode
    auth, and one SuperNode process per box): N = 1 clean, matching the simulation; N = 3
    with box-1 shut down in the prune round and box-2 paused in the embed round, both masked
    and named, box-0 matching the simulation. A rerun after such faults redoes only the
    missing work: checked on the simulation runtime (test_federation.py), whose nodes keep
    their models in the same store code as the boxes (a deployment rerun costs a minute here)."""
    sim_out, _ = smoke_run
    out = tmp_path / "dep"
    stop = threading.Event()
    cont = threading.Thread(target=_continue_when, args=(out, 3, ("fuse", "evaluate"), stop), daemon=True)
    cont.start()
    # box-1 gets SIGTERM: its SuperNode deactivates itself and the round learns it at once
    # (a box that dies without a word, SIGKILL, is only dropped after Flower's two missed
    # 30 s heartbeats or the round's timeout). box-2 is stopped, so the embed round's
    # timeout is what drops it. prune_timeout leaves the live boxes room on slow machines
    timeouts = ("--set", "sim.prune_timeout=90", "--set", "sim.embed_timeout=30")
    try:
        r = _deploy(out, sim_out / "base.pt", shared_archive, 3, *timeouts,
                    env={"PAPM_TEST_BOX_SIGNAL": "box-1=prune:TERM,box-2=embed:STOP"})
    finally:
        stop.set()
        cont.join(timeout=10)
    assert r.returncode == 0, r.stderr[-2000:]
    # N = 1, clean: the box's device model matches the simulation's (threads 1 vs 2, smoke: fp32);
    # the head is checked against its files (its keep-or-drop gate can flip on the smoke
    # preset's near-chance embeddings)
    one, ref1 = (json.loads((d / "n1" / "result.json").read_text()) for d in (out, sim_out))
    assert one["missing"] == [] and [d["node"] for d in one["per_device"]] == ["box-0"]
    assert abs(one["per_device"][0]["test_acc"] - ref1["per_device"][0]["test_acc"]) <= 2.0
    assert one["fusion"]["test_acc"] == pytest.approx(
        fused_from_files(out / "n1", [out / "store" / "box-0"], shared_archive, 100), abs=0.11)
    assert one["per_device"][0]["latency_ms"] > 0 and "TLS" in one["engine"]
    assert "https://" in (out / "logs" / "superlink.log").read_text()  # TLS on
    # N = 3 with faults: the stats round had every box, so the groups are the simulation's, and
    # box-0, which saw no fault, built the simulation's device 0
    res = json.loads((out / "n3" / "result.json").read_text())
    ref = json.loads((sim_out / "n3" / "result.json").read_text())
    assert res["groups"] == ref["groups"] and [d["node"] for d in res["per_device"]] == ["box-0", "box-1", "box-2"]
    assert abs(res["per_device"][0]["test_acc"] - ref["per_device"][0]["test_acc"]) <= 2.0
    assert set(res["node_compute_s"]["stats"]) == {"box-0", "box-1", "box-2"}
    assert [(m["round"], m["node"]) for m in res["missing"]] == [("prune", "box-1"), ("embed", "box-2")]
    assert "Node Unavailable" in res["missing"][0]["reason"] and "timeout" in res["missing"][1]["reason"]
    assert [d["masked"] for d in res["per_device"]] == [False, True, True]
    # box-2's late embed reply (it was continued after the timeout) never entered the head:
    # the head reads box-0 alone, and its figure is recomputed from the files
    from papm_core import checkpoint
    assert [d["device"] for d in checkpoint.read(out / "n3" / "fusion.pt")[1]["devices"]] == [0]
    assert res["fusion"]["test_acc"] == pytest.approx(
        fused_from_files(out / "n3", [out / "store" / "box-0"], shared_archive, 100), abs=0.11)
    report = (out / "REPORT.md").read_text()
    assert "prune:box-1" in report and "embed:box-2" in report
    assert "## Rounds over the network" in report and "deployment" in report
    assert flower_processes(out) == []
