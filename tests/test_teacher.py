"""Precomputed teacher targets: exact for every flip view, cached per class, keyed by the
teacher's weights, and fine-tuning from them equals fine-tuning with the live teacher;
the step floor (``min_steps``) that gives small shards more epochs."""

from __future__ import annotations

import pytest
import torch

from papm_core.config import PruneConfig
from papm_core.data import subsample
from papm_core.finetune import _Teacher, finetune, finetune_epochs, validated
from papm_core.loader import flip_batches
from papm_core.models import build_model, resnet18_spec
from papm_core.prune import slim, units
from papm_core.teacher import cached_flip_logits, flip_logits, model_key
from papm_core.util import PapmError


def _model(seed, width=0.125, k=10):
    torch.manual_seed(seed)
    m = build_model(resnet18_spec(width, k)).train()
    with torch.no_grad():
        m(torch.randn(32, 3, 32, 32))  # non-trivial BatchNorm statistics
    return m.eval()


def test_table_equals_live_teacher_on_every_view(cifar):
    base = _model(0)
    split = subsample(cifar.train, 6)  # 60 images of 10 classes
    table = flip_logits(base, split, precision="fp32")
    assert table.shape == (60, 2, 10)
    assert not torch.allclose(table[:, 0], table[:, 1]), "mirrored views must differ"
    gen = torch.Generator().manual_seed(0)
    flips = 0
    for x, y, idx, flip in flip_batches(split, 16, gen, channels_last=True):
        assert torch.equal(y, split.y[idx])
        live = base(x).float()
        looked_up = _Teacher(base, table)(x, idx, flip)
        torch.testing.assert_close(looked_up, live, atol=1e-4, rtol=1e-4)
        flips += int(flip.sum())
    assert 0 < flips < 60, "flip-only augmentation must mirror some images and keep others"


def test_cache_per_class_and_keyed_by_weights(cifar, tmp_path):
    split = subsample(cifar.train, 4).shard([1, 4, 7])
    base = _model(0)
    first = cached_flip_logits(base, split, tmp_path, "fp32")
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == 3, "one table per class"
    torch.testing.assert_close(first, flip_logits(base, split, "fp32"), atol=1e-5, rtol=1e-5)
    # a subset of the classes reuses their tables: nothing new is written
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    part = cached_flip_logits(base, split.shard([4]), tmp_path, "fp32")
    assert sorted(tmp_path.glob("*.npy")) == files and all(f.stat().st_mtime_ns == t for f, t in mtimes.items())
    torch.testing.assert_close(part, first[split.y == 4])
    # other weights: another key, new tables, other values
    other = _model(1)
    assert model_key(other) != model_key(base)
    again = cached_flip_logits(other, split, tmp_path, "fp32")
    assert len(list(tmp_path.glob("*.npy"))) == 6 and not torch.allclose(again, first)
    # a damaged entry is recomputed, not read
    files[0].write_bytes(b"junk")
    torch.testing.assert_close(cached_flip_logits(base, split, tmp_path, "fp32"), first)


def _device(base):
    keep = {u.name: list(range(max(8, u.width // 2))) for u in units(base)}
    return slim(base, keep)


def test_finetune_from_tables_equals_live_teacher(cifar, tmp_path, monkeypatch):
    base = _model(0)
    data = subsample(cifar.train, 24)
    shard, ref, val = data.shard([2, 5]), subsample(cifar.train, 3), subsample(cifar.test, 4)
    val = val.take(torch.arange(len(val)), name="val")
    cfg = PruneConfig(classes=[2, 5], epochs=2, batch_size=16, lr=0.05, augment="flip",
                      precision="fp32", ce_weight=0.5)
    a = finetune(_device(base), base, shard, val, cfg, ref=ref, teacher_cache=tmp_path)
    assert list(tmp_path.glob("*.npy")), "the tables were cached"

    class Live(_Teacher):  # the same training with the teacher run on every batch
        def __init__(self, base, table):
            super().__init__(base, None)

        def __call__(self, x, idx, flip):
            return super().__call__(x, idx, flip)

    monkeypatch.setattr("papm_core.finetune._Teacher", Live)
    b = finetune(_device(base), base, shard, val, cfg, ref=ref)
    assert [h["epoch"] for h in a.history] == [0, 1, 2]
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-4, rtol=2e-4)
    # the trained weights of every epoch agree too (held-out objective), and training moved them
    for ha, hb in zip(a.history, b.history):
        assert ha["val_loss"] == pytest.approx(hb["val_loss"], abs=1e-4)
    assert abs(a.history[2]["val_loss"] - a.history[0]["val_loss"]) > 1e-3


def test_min_steps_raises_epochs_of_small_shards(cifar, tmp_path):
    cfg = PruneConfig(classes=[2], epochs=3, min_steps=10, batch_size=16)
    assert finetune_epochs(cfg, 32) == 5      # 2 batches per epoch: 5 epochs reach 10 steps
    assert finetune_epochs(cfg, 200) == 3     # 13 batches per epoch: the floor is already met
    assert finetune_epochs(PruneConfig(classes=[2], epochs=0, min_steps=10), 32) == 0
    base = _model(0)
    shard = subsample(cifar.train, 24).shard([2, 5])  # 48 images: 3 batches of 16
    val = subsample(cifar.test, 4)
    val = val.take(torch.arange(len(val)), name="val")
    cfg = PruneConfig(classes=[2, 5], epochs=1, min_steps=7, batch_size=16, lr=0.05,
                      augment="flip", precision="fp32")
    res = finetune(_device(base), base, shard, val, cfg, ref=subsample(cifar.train, 3),
                   teacher_cache=tmp_path)
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]  # ceil(7 / 3) epochs
    assert all(h["epochs"] == 3 for h in res.history[1:])
    # selection validates before training and in the schedule's second half only
    assert [h["val_acc"] is not None for h in res.history] == [True, False, True, True]
    assert res.best_epoch != 1 and [validated(e, 10) for e in (4, 5, 10)] == [False, True, True]
    with pytest.raises(PapmError, match="min-steps"):
        PruneConfig(classes=[2], min_steps=-1).validate()
