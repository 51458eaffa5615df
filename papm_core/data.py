"""Data sources, decode-once cache, stratified validation split and class shards.

Sources (``--data PATH`` or ``$PAPM_DATA``; neither means torchvision's CIFAR-10 download):

- an image tree ``{train,test}/{class}/*.png|jpg|jpeg`` as a folder, or as a
  ``.tar``/``.tar.gz``/``.tar.xz`` archive (any common prefix folder is allowed);
- a torchvision CIFAR-10 folder (``cifar-10-batches-py`` or its parent).

Class indices are the sorted class-folder names. Images become RGB; images of another
size are resized with Pillow's bilinear filter (antialiased when shrinking).
Decoded arrays are cached as uint8 ``.npy`` under ``$PAPM_CACHE`` (default
``~/.cache/papm``), keyed by the sha256 of the source's content, so a second load
only memory-maps those files.

Example::

    python -c "from papm_core.data import load_dataset; print(load_dataset('../shared/data/cifar10-jpeg75.tar.xz'))"
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .util import PapmError, atomic_write, file_sha256

IMAGE_SIZE = 32  # pixels; CIFAR geometry, the model's input size
CACHE_VERSION = 1  # bump when decoding changes, so old caches are not reused
_IMG_RE = re.compile(r"^(?:(?P<prefix>.*)/)?(?P<split>train|test)/(?P<cls>[^/]+)/[^/]+\.(?:png|jpe?g)$",
                     re.IGNORECASE)


@dataclass
class Split:
    """One split as uint8 NCHW images and int64 labels (CPU or device tensors).

    ``class_ids`` maps local label -> global class id, so a shard with remapped
    labels still knows which classes it serves.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    class_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.class_ids:
            self.class_ids = list(range(len(self.classes)))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.name, self.x.to(device), self.y.to(device), self.classes, self.class_ids)

    def take(self, idx: torch.Tensor | np.ndarray, name: str | None = None) -> "Split":
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.y.device)
        return Split(name or self.name, self.x[idx], self.y[idx], self.classes, self.class_ids)

    def shard(self, class_ids: Iterable[int], remap: bool = False) -> "Split":
        """The images of the given global classes; ``remap`` relabels them 0..k-1."""
        wanted = list(dict.fromkeys(int(c) for c in class_ids))
        unknown = [c for c in wanted if c not in self.class_ids]
        if unknown or not wanted:
            raise PapmError(f"class ids {unknown or wanted} are not in this data "
                            f"(valid: {self.class_ids})")
        local = [self.class_ids.index(c) for c in wanted]
        mask = torch.isin(self.y, torch.tensor(local, device=self.y.device))
        x, y = self.x[mask], self.y[mask]
        if not remap:
            return Split(self.name, x, y, self.classes, self.class_ids)
        lut = torch.full((len(self.class_ids),), -1, dtype=torch.long, device=y.device)
        lut[torch.tensor(local, device=y.device)] = torch.arange(len(local), device=y.device)
        return Split(self.name, x, lut[y], [self.classes[i] for i in local], wanted)


@dataclass
class Dataset:
    """Train and test splits of one source, with its class names and content key."""

    train: Split
    test: Split
    classes: list[str]
    key: str
    source: str

    def __repr__(self) -> str:
        return (f"Dataset({self.source!r}, classes={len(self.classes)}, train={len(self.train)}, "
                f"test={len(self.test)}, key={self.key[:12]})")


def cache_dir() -> Path:
    return Path(os.environ.get("PAPM_CACHE") or Path.home() / ".cache" / "papm")


def _content_key(path: Path) -> str:
    """sha256 over the bytes of the archive, or over every (relpath, bytes) of a folder."""
    h = hashlib.sha256(f"papm-data-v{CACHE_VERSION}-{IMAGE_SIZE}".encode())
    if path.is_file():
        h.update(file_sha256(path).encode())
    else:
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            h.update(file_sha256(f).encode())
    return h.hexdigest()


def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGBA").convert("RGB") if im.mode in ("P", "PA", "LA") else im.convert("RGB")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise PapmError(f"cannot decode image {name}: {e}; remove or replace that file") from e


def _iter_tree(path: Path) -> Iterator[tuple[str, bytes]]:
    """(relative name, bytes) for every file in a folder or tar archive."""
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            yield f.relative_to(path).as_posix(), f.read_bytes()
        return
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if m.isfile() and _IMG_RE.match(m.name):
                    fh = tar.extractfile(m)
                    if fh is not None:
                        yield m.name, fh.read()
    except (tarfile.TarError, EOFError, OSError) as e:  # lzma/zlib errors are OSError/EOFError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PapmError(f"cannot read archive {path}: {type(e).__name__}: {reason}; "
                        f"re-download it or point --data at an intact copy") from e


def _progress():
    """Decoding progress on a terminal's stderr; nothing in logs or pipes (stdout stays the
    caller's: sim.py's first line names the precision)."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    return Progress(transient=True, console=console, disable=not console.is_terminal)


def _read_tree(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    items: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    with _progress() as prog:
        task = prog.add_task(f"reading {path.name}", total=None)
        for name, data in _iter_tree(path):
            m = _IMG_RE.match(name)
            if m:
                items[m["split"].lower()].append((m["cls"], name, data))
                prog.advance(task)
    classes = sorted({c for c, _, _ in items["train"]})
    test_classes = sorted({c for c, _, _ in items["test"]})
    if not classes or not test_classes:
        raise PapmError(f"no train/<class>/ and test/<class>/ image folders found in {path}; "
                        "expected {train,test}/{class}/*.png|jpg|jpeg")
    if classes != test_classes:
        raise PapmError(f"train and test class folders differ in {path}: "
                        f"{sorted(set(classes) ^ set(test_classes))}")
    arrays, labels = {}, {}
    with _progress() as prog:
        for split, rows in items.items():
            rows.sort(key=lambda r: r[1])  # deterministic order, independent of tar order
            task = prog.add_task(f"decoding {split}", total=len(rows))
            xs = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            for i, (_, name, data) in enumerate(rows):
                xs[i] = _decode(data, name)
                prog.advance(task)
            arrays[split] = xs
            labels[split] = np.array([classes.index(c) for c, _, _ in rows], dtype=np.int64)
    return arrays, labels, classes


def _find_torchvision_cifar(path: Path) -> Path | None:
    for cand in (path, path / "cifar-10-batches-py"):
        if (cand / "batches.meta").is_file() and cand.name == "cifar-10-batches-py":
            return cand.parent
    return None


def _read_torchvision(root: Path, download: bool):
    from torchvision.datasets import CIFAR10

    out_x, out_y = {}, {}
    for split in ("train", "test"):
        ds = CIFAR10(str(root), train=(split == "train"), download=download)
        out_x[split] = np.ascontiguousarray(ds.data, dtype=np.uint8)
        out_y[split] = np.asarray(ds.targets, dtype=np.int64)
    return out_x, out_y, list(ds.classes)


def _read_cifar_folder(root: Path):
    try:
        return _read_torchvision(root, download=False)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        raise PapmError(f"the CIFAR-10 folder {root / 'cifar-10-batches-py'} is incomplete or corrupt "
                        f"({str(e).splitlines()[0]}); download it again") from e


def _download_cifar() -> tuple[Path, str]:
    root = cache_dir() / "torchvision"
    try:
        _read_torchvision(root, download=True)
    except Exception as e:  # network errors come in many types
        raise PapmError(f"could not download CIFAR-10 ({type(e).__name__}); offline, pass "
                        "--data PATH or set PAPM_DATA to a local copy (image tree folder or "
                        ".tar/.tar.gz/.tar.xz, or a cifar-10-batches-py folder)") from e
    return root, "cifar10-torchvision"


def _cache_load(key: str):
    d = cache_dir() / key
    meta_f = d / "meta.json"
    if not meta_f.is_file():
        return None
    try:
        meta = json.loads(meta_f.read_text())
        xs = {s: np.load(d / f"{s}_x.npy") for s in ("train", "test")}
        ys = {s: np.load(d / f"{s}_y.npy") for s in ("train", "test")}
        return xs, ys, meta["classes"]
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache is rebuilt, never trusted


def _cache_store(key: str, xs, ys, classes) -> None:
    d = cache_dir() / key
    for s in ("train", "test"):
        atomic_write(d / f"{s}_x.npy", lambda p, a=xs[s]: np.save(open(p, "wb"), a))
        atomic_write(d / f"{s}_y.npy", lambda p, a=ys[s]: np.save(open(p, "wb"), a))
    # meta.json last: its presence marks a complete cache entry
    atomic_write(d / "meta.json", lambda p: p.write_text(json.dumps({"classes": classes})))


def resolve_source(data: str | None) -> str | None:
    """The data path from the flag, else $PAPM_DATA, else None (= download CIFAR-10)."""
    return data or os.environ.get("PAPM_DATA") or None


def load_dataset(data: str | None = None) -> Dataset:
    """Load (and cache) the data set named by ``data``/``$PAPM_DATA``; see module doc."""
    src = resolve_source(data)
    if src is None:
        root, key = _download_cifar()
        xs, ys, classes = _read_torchvision(root, download=False)
        return _to_dataset(xs, ys, classes, key, "torchvision:CIFAR10")
    path = Path(src).expanduser()
    if not path.exists():
        raise PapmError(f"data path {path} does not exist; pass --data PATH or set PAPM_DATA")
    key = _content_key(path)
    cached = _cache_load(key)
    if cached is None:
        tv_root = _find_torchvision_cifar(path) if path.is_dir() else None
        xs, ys, classes = _read_cifar_folder(tv_root) if tv_root else _read_tree(path)
        _cache_store(key, xs, ys, classes)
    else:
        xs, ys, classes = cached
    return _to_dataset(xs, ys, classes, key, str(path))


def _to_dataset(xs, ys, classes, key, source) -> Dataset:
    def split(s):
        x = torch.from_numpy(np.ascontiguousarray(xs[s])).permute(0, 3, 1, 2).contiguous()
        return Split(s, x, torch.from_numpy(np.asarray(ys[s], dtype=np.int64)), list(classes))

    return Dataset(split("train"), split("test"), list(classes), key, source)


# The validation split and the public reference set each take at most this share of the
# training images (their sizes are caps): CIFAR-10's 5,000 + 5,000 of 50,000 are within it,
# and a data set of a few thousand images still leaves 60 % or more for the devices.
SPLIT_SHARE = 0.2


def fit_split(asked: int, n: int) -> int:
    """A split size capped at ``asked`` images and at SPLIT_SHARE of ``n`` (at least 1)."""
    return min(int(asked), max(1, int(SPLIT_SHARE * n)))


def base_val_size(train: Split, val_size: int, per_class: int = 0) -> int:
    """The validation size a base model trained on ``train`` (after its optional per-class
    subsample, counted from the labels) uses: ``val_size`` capped by ``fit_split``."""
    n = int(torch.bincount(train.y).clamp(max=per_class).sum()) if per_class else len(train)
    return fit_split(val_size, n)


def train_val_split(train: Split, n_val: int = 5000, seed: int = 0,
                    what: str = "validation size", fix: str = "lower --val-size") -> tuple[Split, Split]:
    """Stratified, seeded split of train into (train', val); the two are disjoint.

    Each class gives round(n_val * share) images (at least 1), so class balance holds.
    ``what``/``fix`` name the split and the setting in errors.
    """
    n = len(train)
    if not 0 < n_val < n:
        raise PapmError(f"{what} {n_val} must lie in (0, {n}); {fix}")
    rng = np.random.default_rng(seed)
    y = train.y.cpu().numpy()
    val_idx = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(1, int(round(n_val * len(idx) / n)))
        if k >= len(idx):
            raise PapmError(f"class {train.classes[c]} has only {len(idx)} images, too few for "
                            f"a {what} of {n_val}; {fix}")
        val_idx.append(rng.permutation(idx)[:k])
    val_idx = np.sort(np.concatenate(val_idx))
    keep = np.ones(n, dtype=bool)
    keep[val_idx] = False
    return train.take(np.flatnonzero(keep), "train"), train.take(val_idx, "val")


def carve(train: Split, val_size: int, seed: int, per_class: int = 0) -> tuple[Split, Split]:
    """The (train, val) pair a base model was trained with: optional per-class subsample,
    then the stratified validation split. Later stages call this with the base model's
    recorded config, so validation images never leak into any training set."""
    if per_class:
        train = subsample(train, per_class, seed)
    return train_val_split(train, val_size, seed)


def subsample(split: Split, per_class: int, seed: int = 0) -> Split:
    """The first ``per_class`` images of each class after a seeded shuffle (tests, smoke runs)."""
    rng = np.random.default_rng(seed)
    y = split.y.cpu().numpy()
    idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)])
    return split.take(np.sort(idx))


def spread(split: Split, n: int, n_classes: int, seed: int = 0) -> Split:
    """At most ``n`` images of ``split``, spread evenly over its ``n_classes`` classes (a
    seeded ``subsample``): the APoZ calibration set and an int8 runtime's calibration."""
    sub = subsample(split, -(-n // n_classes), seed)
    return sub.take(torch.arange(min(n, len(sub))))
