"""Data sources, cache, validation split, shards and on-device augmentation."""

from __future__ import annotations

import pickle
import tarfile
import time

import numpy as np
import pytest
import torch
from helpers import make_tar, write_tree

from papm_core.data import load_dataset, subsample, train_val_split
from papm_core.loader import augment, batches, normalize
from papm_core.util import PapmError


def test_folder_tree_modes_and_resize(tmp_path):
    root = write_tree(tmp_path / "tree")
    ds = load_dataset(str(root))
    assert ds.classes == ["cat", "dog", "emu"]
    assert ds.train.x.shape == (18, 3, 32, 32) and ds.train.x.dtype == torch.uint8
    assert ds.test.x.shape == (9, 3, 32, 32)
    assert sorted(torch.bincount(ds.train.y).tolist()) == [6, 6, 6]
    # the class-dependent channel survives decoding (and resizing) for every mode
    from PIL import Image
    im = Image.open(root / "train" / "dog" / "0001.png").convert("RGB")
    assert np.array_equal(np.asarray(im).transpose(2, 0, 1), ds.train.x[7].numpy())


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:gz", ".tar.gz"), ("w:xz", ".tar.xz")])
def test_archives_equal_folder(tmp_path, mode, suffix):
    root = write_tree(tmp_path / "tree")
    folder = load_dataset(str(root))
    arch = load_dataset(str(make_tar(root, tmp_path / f"d{suffix}", mode)))
    assert arch.classes == folder.classes
    assert torch.equal(arch.train.x, folder.train.x) and torch.equal(arch.test.y, folder.test.y)


def test_slice_of_shared_archive(tmp_path, shared_archive, cifar):
    """A 2-class slice of the real archive decodes to exactly the full load's pixels."""
    if not (shared_archive.is_file() and tarfile.is_tarfile(shared_archive)):
        pytest.skip(f"needs the test data as a tar archive, not {shared_archive}")
    dest = tmp_path / "slice.tar.xz"
    keep = {"train": 20, "test": 10}
    counts = {}
    with tarfile.open(shared_archive) as src, tarfile.open(dest, "w:xz") as out:
        for m in src:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[2] in ("cat", "ship"):
                key = (parts[1], parts[2])
                if counts.get(key, 0) < keep[parts[1]]:
                    counts[key] = counts.get(key, 0) + 1
                    out.addfile(m, src.extractfile(m))
    ds = load_dataset(str(dest))
    assert ds.classes == ["cat", "ship"] and len(ds.train) == 40 and len(ds.test) == 20
    names = sorted(n for n in tarfile.open(dest).getnames() if "/train/cat/" in n)
    full_names = sorted(n for n in _names(shared_archive) if "/train/cat/" in n)
    i = full_names.index(names[0])
    cat_full = cifar.train.x[cifar.train.y == cifar.classes.index("cat")]
    assert torch.equal(ds.train.x[0], cat_full[i])


_NAMES = {}


def _names(path):
    if path not in _NAMES:
        with tarfile.open(path) as t:
            _NAMES[path] = [m.name for m in t if m.isfile()]
    return _NAMES[path]


def test_shared_archive_full_and_cached(shared_archive, cifar):
    assert cifar.classes[0] == "airplane" and cifar.classes[9] == "truck"
    assert len(cifar.train) == 50000 and len(cifar.test) == 10000
    assert torch.bincount(cifar.test.y).tolist() == [1000] * 10
    t0 = time.perf_counter()
    again = load_dataset(str(shared_archive))
    assert time.perf_counter() - t0 < 2.0, "a cached load must take under 2 s"
    assert torch.equal(again.test.x, cifar.test.x) and again.key == cifar.key


def test_torchvision_folder(tmp_path, monkeypatch):
    """The official cifar-10-batches-py layout (integrity check stubbed: fake bytes)."""
    from torchvision.datasets import CIFAR10
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    names = ["c%d" % i for i in range(10)]
    for f, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 5)]:
        blob = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                "labels": rng.integers(0, 10, n).tolist()}
        (d / f).write_bytes(pickle.dumps(blob))
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    ds = load_dataset(str(tmp_path))
    assert ds.classes == names and len(ds.train) == 20 and len(ds.test) == 5
    assert ds.train.x.shape[1:] == (3, 32, 32)


def test_bad_sources(tmp_path):
    with pytest.raises(PapmError, match="does not exist"):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty" / "stuff").mkdir(parents=True)
    with pytest.raises(PapmError, match="no train/<class>/"):
        load_dataset(str(tmp_path / "empty"))
    bad = tmp_path / "bad.tar.xz"
    bad.write_bytes(b"\xfd7zXZ\x00" + b"garbage" * 100)
    with pytest.raises(PapmError, match="cannot read archive"):
        load_dataset(str(bad))


def test_val_split_stratified_and_disjoint(cifar):
    train, val = train_val_split(cifar.train, 5000, seed=0)
    assert len(val) == 5000 and len(train) == 45000
    assert torch.bincount(val.y).tolist() == [500] * 10
    # disjoint: no validation image occurs among the training images
    tr_keys = set(map(bytes, train.x.reshape(len(train), -1).numpy()))
    va_keys = [bytes(r) for r in val.x.reshape(len(val), -1).numpy()]
    assert not any(k in tr_keys for k in va_keys)
    t2, v2 = train_val_split(cifar.train, 5000, seed=0)
    assert torch.equal(v2.x, val.x), "the split must be fixed by its seed"
    _, v3 = train_val_split(cifar.train, 5000, seed=1)
    assert not torch.equal(v3.x, val.x)


def test_val_split_indices_disjoint():
    from papm_core.data import Split
    # each image carries its own index as pixel value, so overlap is checkable exactly
    s = Split("train", torch.arange(300).view(300, 1, 1, 1).expand(300, 3, 32, 32),
              torch.arange(300) % 3, ["a", "b", "c"])
    tr, va = train_val_split(s, 30, seed=0)
    ids_tr, ids_va = set(tr.x[:, 0, 0, 0].tolist()), set(va.x[:, 0, 0, 0].tolist())
    assert not ids_tr & ids_va and len(ids_tr | ids_va) == 300
    assert torch.bincount(va.y).tolist() == [10, 10, 10]


def test_shard_holds_exactly_its_classes(cifar):
    sh = cifar.test.shard([3, 5])
    assert set(sh.y.unique().tolist()) == {3, 5} and len(sh) == 2000
    rm = cifar.test.shard([5, 3], remap=True)
    assert rm.classes == ["dog", "cat"] and rm.class_ids == [5, 3]
    assert set(rm.y.unique().tolist()) == {0, 1}
    assert torch.equal(rm.x[rm.y == 0], cifar.test.x[cifar.test.y == 5])
    with pytest.raises(PapmError):
        cifar.test.shard([11])


def test_augment_shape_dtype_changes_and_determinism(cifar):
    x = cifar.test.x[:64]
    a = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert (a != x).float().mean() > 0.3, "augmentation must really change the images"
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(0)))
    # a pure flip with zero shift is reachable: every output row is a crop of the padded input
    f = normalize(a)
    assert f.dtype == torch.float32 and abs(f.mean().item()) < 1.0


def test_batches_cover_split_once(cifar):
    s = subsample(cifar.test, 30)
    seen = torch.cat([y for _, y in batches(s, 64, train=True, gen=torch.Generator().manual_seed(1))])
    assert sorted(seen.tolist()) == sorted(s.y.tolist())
    ev = [y for _, y in batches(s, 64, train=False)]
    assert torch.equal(torch.cat(ev), s.y)


def test_offline_download_is_one_clear_error(monkeypatch, tmp_path):
    """No --data and no PAPM_DATA means torchvision's download; offline that is one line."""
    import urllib.error

    import papm_core.data as data_mod

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data_mod, "_read_torchvision", offline)
    monkeypatch.delenv("PAPM_DATA", raising=False)
    with pytest.raises(PapmError, match="could not download CIFAR-10 .*PAPM_DATA"):
        load_dataset(None)


def test_splits_sized_to_the_data_and_checked_before_training(tmp_path):
    """The quick preset's 5,000-image validation and reference sizes are caps: on a data set
    of 150 training images each takes at most SPLIT_SHARE of them, the devices keep the rest,
    and sim.py accepts it; a data set too small for the devices fails in sim.py at once, in one
    line naming the split, before any training."""
    import sys

    from helpers import ROOT

    from papm_core.config import TrainConfig
    from papm_core.data import SPLIT_SHARE
    from papm_core.specialize import planned_split, reference_splits

    ds = load_dataset(str(write_tree(tmp_path / "small", per_split=(50, 2))))  # 3 classes x 50
    split = planned_split(ds, TrainConfig(val_size=5000), ref_size=5000, node_val=0.1)
    c = reference_splits(ds, split)
    assert split["val_size"] == len(c.val) == int(SPLIT_SHARE * 150) == 30
    assert len(c.ref) == 30 and len(c.private) + len(c.node_val) == 90  # the devices keep 60 %
    assert sorted(torch.bincount(c.private.y).tolist()) == [27, 27, 27]
    sys.path.insert(0, str(ROOT))
    import sim

    cfg, devices, _ = sim.resolve(sim.parse_args(["--preset", "quick", "--data", str(tmp_path / "small"),
                                                  "--devices", "2", "--out", str(tmp_path / "run")]))
    assert devices == [1, 2] and cfg["train"]["val_size"] == 5000  # the preset as asked, the cap applied
    tiny = write_tree(tmp_path / "tiny", per_split=(3, 1))  # 3 per class: nothing left for the devices
    with pytest.raises(PapmError, match=r"^devices' held-out size .* must lie in|^class .* too few for a devices"):
        sim.resolve(sim.parse_args(["--preset", "quick", "--data", str(tiny), "--devices", "2",
                                     "--out", str(tmp_path / "r2")]))


def test_the_base_records_the_validation_size_it_used(tmp_path):
    """papm train caps the validation split to the data and records the size used, so every
    later stage carves exactly its validation images (none leak into a training set)."""
    from papm_core.config import TrainConfig
    from papm_core.train import prepare_data

    cfg = TrainConfig(data=str(write_tree(tmp_path / "t", per_split=(20, 2))), val_size=5000)
    _, train, val, _ = prepare_data(cfg, torch.device("cpu"))
    assert cfg.val_size == len(val) == 12 and len(train) == 48


def test_the_suite_without_test_data_stops_at_once_in_one_line(tmp_path):
    """A PAPM_TEST_ARCHIVE that is not there stops the whole session at once, exit 2, with
    one line naming it, instead of erroring every test that needs real data."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    env = {**os.environ, "PAPM_TEST_ARCHIVE": str(tmp_path / "missing.tar.xz")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_data.py::test_shared_archive_full_and_cached",
                        "tests/test_data.py::test_slice_of_shared_archive"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stdout.splitlines() if "PAPM_TEST_ARCHIVE" in ln]
    assert r.returncode == 2 and len(lines) == 1 and "does not exist" in lines[0]
    assert "error" not in r.stdout.splitlines()[-1].lower()  # stopped, not 2 errors


def test_decoding_writes_nothing_to_a_pipe(tmp_path):
    """A first (uncached) decode shows progress only on a terminal: piped, stdout and stderr
    stay empty, so a caller's first line (sim.py names the precision there) stays first."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    tree = write_tree(tmp_path / "tree")
    env = {**os.environ, "PAPM_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", f"from papm_core.data import load_dataset; load_dataset({str(tree)!r})"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    assert any((tmp_path / "cache").rglob("*.npy"))  # it did decode, into the cache
