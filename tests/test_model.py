"""ResNet18 from a width spec, and the checkpoint format."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from papm_core import checkpoint
from papm_core.models import build_model, count_params, resnet18_spec
from papm_core.util import PapmError


def test_full_width_param_count():
    assert count_params(build_model(resnet18_spec(1.0))) == 11_173_962


def test_width_multiplier_shrinks():
    small = build_model(resnet18_spec(0.25))
    assert small.num_features == 128 and count_params(small) < 11_173_962 / 10


def test_non_uniform_spec_runs():
    spec = {"arch": "resnet18", "num_classes": 4, "stem": 24,
            "stages": [{"out": 24, "inner": [8, 16]}, {"out": 40, "inner": [13, 24]},
                       {"out": 72, "inner": [32, 8]}, {"out": 96, "inner": [64, 16]}]}
    m = build_model(spec).eval()
    x = torch.randn(3, 3, 32, 32)
    f = m.forward_features(x)  # timm's contract: the unpooled map, then pool + classify
    assert f.shape == (3, 96, 4, 4) and m(x).shape == (3, 4) and m.num_classes == 4 and m.num_features == 96
    assert torch.allclose(m.forward_head(f), m(x))
    pooled = m.forward_head(f, pre_logits=True)
    assert pooled.shape == (3, 96) and torch.allclose(m.get_classifier()(pooled), m(x))
    assert m.layer2[0].conv1.out_channels == 13 and m.layer3[1].conv1.out_channels == 8


def test_stem_differs_from_stage1_gets_projection():
    spec = resnet18_spec(0.25)
    spec["stem"] = 10
    m = build_model(spec)
    assert len(m.layer1[0].shortcut) == 2 and m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_bad_spec():
    spec = resnet18_spec(0.25)
    spec["stages"][1]["inner"] = [4]
    with pytest.raises(PapmError, match="invalid resnet18 width spec"):
        build_model(spec)


def test_save_load_fresh_process_identical_logits(tmp_path):
    torch.manual_seed(0)
    spec = resnet18_spec(0.25)
    spec["stages"][2]["inner"] = [17, 40]
    m = build_model(spec).eval()
    # give BN non-trivial running stats so they must round-trip too
    m.train()
    m(torch.randn(16, 3, 32, 32))
    m.eval()
    x = torch.randn(5, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    ref = m(x)
    path = checkpoint.save(tmp_path / "m.pt", m, kind="base", class_names=list("abcdefghij"),
                           metrics={"val_acc": 1.0})
    code = ("import sys, torch; from papm_core import checkpoint; "
            "m, meta = checkpoint.load(sys.argv[1]); x = torch.load(sys.argv[2], weights_only=True); "
            "torch.save(m(x).detach(), sys.argv[3]); print(meta['spec']['stages'][2]['inner'])")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[17, 40]"
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), ref.detach())


def test_checkpoint_meta_and_errors(tmp_path):
    m = build_model(resnet18_spec(0.125))
    p = checkpoint.save(tmp_path / "c.pt", m, kind="pruned", class_names=["cat", "dog"],
                        classes=[3, 5], metrics={"acc": 1})
    _, meta = checkpoint.read(p)
    assert meta["kind"] == "pruned" and meta["classes"] == [3, 5]
    assert meta["provenance"]["torch"] == torch.__version__ and "git_commit" in meta["provenance"]
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file may remain"
    data = p.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(PapmError, match="corrupt, truncated"):
        checkpoint.load(tmp_path / "trunc.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(PapmError, match="not a papm checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")
    import fractions
    torch.save({"x": fractions.Fraction(1, 3)}, tmp_path / "pickle.pt")  # needs arbitrary unpickling
    with pytest.raises(PapmError, match="corrupt, truncated or not a papm checkpoint"):
        checkpoint.load(tmp_path / "pickle.pt")
