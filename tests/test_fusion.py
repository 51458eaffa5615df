"""Fusion head: embedding cache, device masking, mismatched devices, test-split audit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import run_cli, write_tree

from papm_core import checkpoint, loader
from papm_core.config import FuseConfig
from papm_core.data import load_dataset, subsample
from papm_core.embedding import cached_embed, embed, embedding_dim
from papm_core.fusion import (
    build_head,
    fused_logits,
    gate,
    head_accuracy,
    head_kind,
    paired_gain_z,
    random_mask,
    train_head,
)
from papm_core.loader import normalize
from papm_core.models import build_model, resnet18_spec
from papm_core.system import fuse_checkpoints, load_system, split_eval
from papm_core.util import PapmError


def _model(seed, width=0.125, k=10):
    torch.manual_seed(seed)
    m = build_model(resnet18_spec(width, k)).train()
    with torch.no_grad():
        m(torch.randn(32, 3, 32, 32))
    return m.eval()


def test_cache_keyed_by_checkpoint(tmp_path, cifar):
    imgs = subsample(cifar.test, 3)
    a = checkpoint.save(tmp_path / "a.pt", _model(0), kind="pruned", class_names=cifar.classes)
    e1 = cached_embed(a, _model(0), imgs, root=tmp_path / "cache")
    assert np.array_equal(e1, cached_embed(a, _model(0), imgs, root=tmp_path / "cache"))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    checkpoint.save(a, _model(1), kind="pruned", class_names=cifar.classes)  # changed weights
    e2 = cached_embed(a, _model(1), imgs, root=tmp_path / "cache")
    assert not np.allclose(e1, e2) and len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert np.array_equal(e2, embed(_model(1), imgs))


def test_cached_equals_live_path(tmp_path, cifar):
    imgs = subsample(cifar.test, 4)
    models = [_model(0), _model(1)]
    paths = [checkpoint.save(tmp_path / f"d{i}.pt", m, kind="pruned", class_names=cifar.classes)
             for i, m in enumerate(models)]
    dims = [embedding_dim(m) for m in models]
    assert dims == [m.num_features + 10 for m in models]
    cached = torch.as_tensor(np.concatenate([cached_embed(p, m, imgs, tmp_path / "c")
                                             for p, m in zip(paths, models)], 1))
    for owners in (None, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]):
        head = build_head(dims, 10, owners=owners).eval()
        live = fused_logits(head, models, normalize(imgs.x))
        assert torch.allclose(head(cached), live, atol=1e-5)
    # the embedding ends with the device's own log-probabilities
    own = torch.as_tensor(cached[:, dims[0] - 10:dims[0]])
    assert torch.allclose(own, torch.log_softmax(models[0](normalize(imgs.x)), 1), atol=1e-5)


def _prior_head():
    """3 devices with 2-d features + 4 log-probabilities each; device 2 serves classes 2, 3
    and so does device 1 for class 3; class 0 and 1 are device 0's."""
    head = build_head([6, 6, 6], 4, owners=[[0, 1], [3], [2, 3]]).eval()
    feats = torch.randn(5, 18)
    for e in (6, 12, 18):
        feats[:, e - 4:e] = torch.log_softmax(torch.randn(5, 4), 1)
    return head, feats


def test_owner_prior_scores_each_class_by_its_devices():
    head, feats = _prior_head()
    lp = [feats[:, e - 4:e] for e in (6, 12, 18)]
    full = torch.ones(5, 3)
    expect = torch.stack([lp[0][:, 0], lp[0][:, 1], lp[2][:, 2], (lp[1][:, 3] + lp[2][:, 3]) / 2], 1)
    assert torch.allclose(head.owner_prior(feats, full), expect, atol=1e-6)
    # the MLP's last layer starts at zero: an untrained head is the prior alone
    assert torch.allclose(head(feats), expect, atol=1e-6)
    # device 0 missing: its classes are scored by every present device, the rest as before
    m = full.clone()
    m[:, 0] = 0
    got = head.owner_prior(feats, m)
    assert torch.allclose(got[:, :2], (lp[1][:, :2] + lp[2][:, :2]) / 2, atol=1e-6)
    assert torch.allclose(got[:, 2:], expect[:, 2:], atol=1e-6)
    # whatever a missing device would have sent is ignored, prior and MLP alike
    with torch.no_grad():
        head.mlp[-1].weight.normal_()
    junk = feats.clone()
    junk[:, :6] = 777.0
    assert torch.equal(head(feats, m), head(junk, m))


def test_owner_spec_checked_and_saved(tmp_path):
    with pytest.raises(PapmError, match="owners"):
        build_head([6, 6], 4, owners=[[0, 1]])  # one device's classes for two devices
    with pytest.raises(PapmError, match="owners"):
        build_head([6, 6], 4, owners=[[0], [4]])  # class 4 of 4
    head, feats = _prior_head()
    with torch.no_grad():
        head.mlp[-1].weight.normal_()
    path = checkpoint.save(tmp_path / "h.pt", head, kind="fusion", class_names=list("abcd"))
    loaded, _ = checkpoint.load(path)
    assert torch.equal(loaded(feats), head(feats))


def test_training_keeps_the_prior_unless_it_beats_it():
    """Epoch 0 (the prior alone) is validated first and competes like any epoch: the head
    returned is the one of the best validated epoch (its accuracy measured again), and the
    prior exactly when no epoch beat it."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (200,), generator=gen)
    def feats(y):
        lp = torch.full((len(y), 4), -3.0)
        lp[torch.arange(len(y)), y] = -0.1  # a device that is always right
        lp = torch.where(torch.rand(len(y), 1, generator=gen) < 0.8, lp, lp.roll(1, 1))  # 80 %
        return torch.cat([torch.randn(len(y), 2, generator=gen), lp, torch.randn(len(y), 6, generator=gen)], 1)
    tr, va = feats(y), feats(y)
    res = train_head(tr.numpy(), y.numpy(), va.numpy(), y.numpy(), [6, 6], 4, FuseConfig(epochs=5, patience=5),
                     owners=[[0, 1, 2, 3], []])
    prior = 100.0 * (res.head.owner_prior(va, torch.ones(200, 2)).argmax(1) == y).float().mean().item()
    assert abs(prior - 80.0) < 8.0 and res.prior_val == prior
    scores = [prior] + [h["val_acc"] for h in res.history]
    assert res.best_val == max(scores) and scores[res.best_epoch] == res.best_val
    assert head_accuracy(res.head, va, y) == res.best_val  # the selected epoch's weights were restored
    if res.best_epoch == 0:
        assert torch.equal(res.head(va).argmax(1), res.head.owner_prior(va, torch.ones(200, 2)).argmax(1))


def test_paired_gain_z():
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    old = torch.tensor([0, 1, 2, 3, 1, 2, 3, 0, 0, 0])   # right on 0-3 and 8
    new = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 1, 0])   # right on 0-7: 4 gained, 1 lost
    assert paired_gain_z(old, new, y) == pytest.approx(3 / 5 ** 0.5)
    assert paired_gain_z(new, old, y) == pytest.approx(-3 / 5 ** 0.5)
    assert paired_gain_z(old, old, y) == 0.0


def _informative_features(n, gen):
    """Devices whose log-probabilities say nothing (uniform) but whose 2-d features give the
    class (4 classes): the MLP can beat the prior by far, so its gain is significant."""
    y = torch.randint(0, 4, (n,), generator=gen)
    angle = y.float() * (np.pi / 2)
    f = torch.stack([angle.cos(), angle.sin()], 1) * 3 + 0.3 * torch.randn(n, 2, generator=gen)
    lp = torch.full((n, 4), float(np.log(0.25))) + 0.01 * torch.randn(n, 4, generator=gen)
    return torch.cat([f, lp], 1), y


def test_mlp_kept_only_on_a_significant_gain_on_the_gate_half():
    """The selected MLP replaces the prior only if its paired gain on the gate half (images
    that chose neither its epoch nor its seed) reaches ``min_gain_z``: a large, real gain
    passes 1.645; an unreachable threshold gives back the prior exactly."""
    gen = torch.Generator().manual_seed(1)
    (tr, ytr), (va, yva), (ga, yga) = (_informative_features(n, gen) for n in (400, 300, 300))
    kw = dict(cfg=FuseConfig(epochs=30, patience=30), owners=[[0, 1, 2, 3]])
    res = gate(train_head(tr.numpy(), ytr.numpy(), va.numpy(), yva.numpy(), [6], 4, **kw),
               ga.numpy(), yga.numpy(), 1.645)
    assert res.best_epoch > 0 and res.kept_mlp and res.gain_z >= 1.645 and head_kind(res) == "prior + MLP"
    assert res.gate["mlp_acc"] > res.gate["prior_acc"] + 30 and res.gate["images"] == 300
    strict = gate(train_head(tr.numpy(), ytr.numpy(), va.numpy(), yva.numpy(), [6], 4, **kw),
                  ga.numpy(), yga.numpy(), 1e6)
    assert not strict.kept_mlp and strict.gain_z == res.gain_z and head_kind(strict) == "prior"
    prior = strict.head.owner_prior(ga, torch.ones(len(ga), 1)).argmax(1)
    assert torch.equal(strict.head(ga).argmax(1), prior)


def test_mask_is_the_training_dropout():
    head = build_head([4, 6, 3], 5).eval()
    feats = torch.randn(8, 13)
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(8, 3, 0.5, gen)
    assert (mask.sum(1) >= 1).all()
    z = head.combine(feats, mask)
    # a masked device contributes exactly zeros; present ones are rescaled by N / n_present
    for i, (s, e) in enumerate([(0, 4), (4, 10), (10, 13)]):
        rows = mask[:, i] == 0
        assert torch.all(z[rows, s:e] == 0)
    assert torch.equal(z[:, 13:], mask)
    one_missing = torch.ones(8, 3)
    one_missing[:, 1] = 0
    direct = head(feats, one_missing)
    zeroed = feats.clone()
    zeroed[:, 4:10] = 12345.0  # whatever a missing device would have sent is ignored
    assert torch.equal(direct, head(zeroed, one_missing))


def test_missing_device_above_chance(cifar):
    """Two weak (random-init) extractors, 3 classes: the head still works with one missing."""
    tr = subsample(cifar.train.shard([0, 1, 6], remap=True), 120, seed=0)
    va = subsample(cifar.test.shard([0, 1, 6], remap=True), 100, seed=0)
    models = [_model(0), _model(1)]
    f_tr = np.concatenate([embed(m, tr) for m in models], 1)
    f_va = np.concatenate([embed(m, va) for m in models], 1)
    res = train_head(f_tr, tr.y.numpy(), f_va, va.y.numpy(), [embedding_dim(m) for m in models], 3,
                     FuseConfig(epochs=60, patience=60, lr=2e-3, device_dropout=0.3))
    fv = torch.as_tensor(f_va)
    for i in range(2):
        mask = torch.ones(len(fv), 2)
        mask[:, i] = 0
        # measured 59.7-71.3% with either device missing over seeds 0-2; chance is 33%
        assert head_accuracy(res.head, fv, va.y, mask) > 45.0


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    d = tmp_path_factory.mktemp("sys")
    tree = write_tree(d / "tree", classes=tuple("abcd"), per_split=(20, 5))
    base = _model(0, 0.125, 4)
    bpath = checkpoint.save(d / "base.pt", base, kind="base", class_names=list("abcd"),
                            config={"val_size": 8, "seed": 0})
    info = {"sha256": "x", "split": {"val_size": 8, "seed": 0, "per_class": 0, "ref_size": 16, "node_val": 0.1}}
    paths = [checkpoint.save(d / f"dev{i}.pt", _model(i + 1, 0.125, 4), kind="pruned",
                             class_names=list("abcd"), extra={"served_classes": g, "base": info})
             for i, g in enumerate([[0, 1], [2, 3]])]
    return d, tree, bpath, paths


def test_fuse_never_reads_test_and_eval(system, monkeypatch, tmp_path):
    d, tree, bpath, paths = system
    monkeypatch.setenv("PAPM_CACHE", str(tmp_path / "cache"))
    loader.READS.clear()
    res = fuse_checkpoints(paths, tmp_path / "head.pt", str(tree), FuseConfig(epochs=3, patience=3))
    assert loader.READS["test"] == 0 and loader.READS["ref"] == 16 * 2 and loader.READS["val"] > 0
    assert res["epochs_run"] == 3
    r = split_eval(tmp_path / "head.pt", bpath, str(tree), runs=200)
    assert loader.READS["test"] > 0
    assert r["devices"] == 2 and len(r["missing_one"]) == 2 and r["end_to_end_ms"] > max(r["device_latency_ms"])
    assert "base" in r and set(r["test_per_class"]) == set("abcd")
    system = load_system(tmp_path / "head.pt")
    head, models = system.head, system.models  # the live path, image by image
    test = load_dataset(str(tree)).test
    live = 100.0 * (fused_logits(head, models, normalize(test.x)).argmax(1) == test.y).float().mean().item()
    assert r["test_acc"] == pytest.approx(live, abs=100.0 / len(test) + 1e-9)


def test_head_against_wrong_devices(system, tmp_path, monkeypatch):
    d, tree, bpath, paths = system
    monkeypatch.setenv("PAPM_CACHE", str(tmp_path / "cache"))
    fuse_checkpoints(paths, tmp_path / "head.pt", str(tree), FuseConfig(epochs=1, patience=1))
    with pytest.raises(PapmError, match="does not match"):
        load_system(tmp_path / "head.pt", [str(paths[1]), str(paths[0])])
    with pytest.raises(PapmError, match="expects 2 device models"):
        load_system(tmp_path / "head.pt", [str(paths[0])])
    res = run_cli("eval", "--split", tmp_path / "head.pt", "--ckpts", paths[1], paths[0],
                  "--data", tree)
    assert res.returncode == 2 and "does not match" in res.stderr


def test_fuse_and_split_eval_cli(system, tmp_path):
    d, tree, bpath, paths = system
    env = {"PAPM_CACHE": str(tmp_path / "cache")}
    head = tmp_path / "h.pt"
    res = run_cli("fuse", "--ckpts", *paths, "--data", tree, "--epochs", 2, "--out", head, env=env)
    assert res.returncode == 0, res.stderr
    ev = run_cli("eval", "--split", head, "--base", bpath, "--data", tree, "--json", tmp_path / "r.json",
                 "--csv", tmp_path / "r.csv", env=env)
    assert ev.returncode == 0, ev.stderr
    assert "fused system" in ev.stdout and "one device missing" in ev.stdout
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("devices,test_acc")
    # groups.json naming: a missing device checkpoint is named in one line
    (tmp_path / "g.json").write_text('{"groups": {"2": [[0, 1], [2, 3]]}}')
    miss = run_cli("fuse", "--groups", tmp_path / "g.json", "--devices", 2, "--ckpt-dir", d,
                   "--data", tree, env=env)
    assert miss.returncode == 2 and "pruned_class0-1_th77.pt" in miss.stderr
