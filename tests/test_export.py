"""papm export: a checkpoint to ONNX (fp32 or int8), written only when it matches PyTorch on
real images; papm eval times and scores the file in onnxruntime."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, write_tree

from papm_core import checkpoint
from papm_core.models import build_model, resnet18_spec
from papm_core.util import PapmError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    tree = write_tree(d / "tree", classes=tuple("abcd"), per_split=(12, 3))
    m = build_model(resnet18_spec(0.125, 4))
    with torch.no_grad():  # BatchNorm statistics away from their defaults, as in a trained model
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    split = {"val_size": 8, "seed": 0, "per_class": 0}  # as papm train records it, for this small tree
    return d, tree, checkpoint.save(d / "base.pt", m, kind="base", class_names=list("abcd"), config=split)


def test_export_matches_pytorch_and_carries_its_metadata(base):
    d, tree, ckpt = base
    out = d / "base.onnx"
    r = run_cli("export", ckpt, "--format", "onnx", "--out", out, "--data", tree, "--images", 24)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith(f"wrote {out} (") and "on 24 real images" in line
    diff = float(line.split("max |Δ logit| ")[1].split(",")[0])
    assert diff <= 1e-3 and "top-1 agreement 100.00 %" in line
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == list("abcd") and json.loads(meta["papm_spec"])["arch"] == "resnet18"
    assert [f.name for f in d.iterdir() if f.name.startswith(".")] == []  # no temporary left


def test_export_refuses_a_mismatch_and_bad_input_writing_nothing(base, tmp_path):
    from papm_core.export import export_onnx

    _, tree, ckpt = base
    with pytest.raises(PapmError, match="ONNX logits differ from PyTorch"):
        export_onnx(ckpt, tmp_path / "m.onnx", str(tree), images=8, tolerance=-1.0)  # nothing can pass
    assert list(tmp_path.iterdir()) == []
    r = run_cli("export", ckpt, "--out", tmp_path / "m.pt", "--data", tree)
    assert r.returncode == 2 and r.stderr.startswith("papm: error: --out") and len(r.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_int8_is_calibrated_on_its_own_classes_and_checked_on_validation(base):
    d, tree, ckpt = base
    model, meta = checkpoint.load(ckpt)
    split = {**meta["config"], "ref_size": 6, "node_val": 0.1}
    dev = checkpoint.save(d / "device.pt", model, kind="pruned", class_names=list("abcd"),
                          extra={"served_classes": [1, 2], "base": {"split": split}})
    out = d / "device.int8.onnx"
    r = run_cli("export", dev, "--int8", "--calib-images", 6, "--out", out, "--data", tree, "--images", 8)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-2]
    # 6 calibration images of classes b and c; 8 validation images, 2 per class, 4 of them its own
    assert line.startswith("int8, calibrated on 6 training images of its classes; on 8 validation images")
    assert "on its own (4 images)" in line
    agreement = float(line.split("top-1 agreement with fp32 ")[1].split(" %")[0])
    assert 0.0 <= agreement <= 100.0
    meta8 = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert meta8["papm_precision"] == "int8" and meta8["served_classes"] == [1, 2]
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)
    fp32 = d / "device.onnx"
    assert run_cli("export", dev, "--out", fp32, "--data", tree, "--images", 8).returncode == 0
    assert out.stat().st_size < fp32.stat().st_size


def test_eval_of_an_onnx_file_scores_as_the_checkpoint_does(base):
    d, tree, ckpt = base
    out = d / "base.onnx"
    if not out.exists():
        assert run_cli("export", ckpt, "--out", out, "--data", tree, "--images", 8).returncode == 0
    got, want = d / "onnx.json", d / "pt.json"
    r = run_cli("eval", out, "--data", tree, "--runs", 200, "--json", got)
    assert r.returncode == 0, r.stderr
    assert "run by onnxruntime" in r.stdout and "on cpu (onnxruntime)" in r.stdout
    assert run_cli("eval", ckpt, "--data", tree, "--runs", 200, "--json", want).returncode == 0
    g, w = json.loads(got.read_text()), json.loads(want.read_text())
    assert g["test_images"] == w["test_images"] == 12
    assert g["test_per_class"] == pytest.approx(w["test_per_class"]) and g["latency"]["median_ms"] > 0
    bad = d / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    r = run_cli("eval", bad, "--data", tree)
    assert r.returncode == 2 and r.stderr.startswith(f"papm: error: {bad}") and len(r.stderr.splitlines()) == 1


def test_a_device_is_timed_in_the_runtime_it_was_pruned_for(tmp_path):
    """The evaluate round's latency comes from the runtime in the device model's config
    (int8 calibrated on the images the node supplies), and is cached per runtime."""
    from papm_core.node import evaluate_images

    torch.manual_seed(0)
    model = build_model(resnet18_spec(0.125, 3)).eval()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8).numpy()
    asked = []

    def calib(classes):
        asked.append(classes)
        return torch.randn(16, 3, 32, 32)
    for runtime in ("torch", "onnxruntime-int8"):
        path = tmp_path / f"{runtime}.pt"
        checkpoint.save(path, model, kind="pruned", class_names=["a", "b", "c"], metrics={},
                        config={"runtime": runtime}, extra={"served_classes": [0, 2]})
        res = evaluate_images(path, x, tmp_path / "store", 200, calib)
        assert res["runtime"] == runtime and res["latency_ms"] > 0 and res["pred"].shape == (6,)
    assert asked == [[0, 2]]  # only int8 calibrates, on the device's own classes
    names = sorted(p.name for p in (tmp_path / "store" / "latency").iterdir())
    assert len(names) == 2 and any(n.endswith("-onnxruntime-int8.json") for n in names)
