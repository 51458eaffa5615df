"""papm export: a checkpoint to ONNX, written only when it matches PyTorch on real images."""

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
    tree = write_tree(d / "tree", classes=tuple("abcd"), per_split=(8, 2))
    m = build_model(resnet18_spec(0.125, 4))
    with torch.no_grad():  # BatchNorm statistics away from their defaults, as in a trained model
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return d, tree, checkpoint.save(d / "base.pt", m, kind="base", class_names=list("abcd"))


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
