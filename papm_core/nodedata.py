"""What a node holds, without Flower: its ``LocalData`` (private training images and its
own held-out images), from a data set it carves exactly as the server does (simulation)
or from an edge box's own data file (``papm shard``: ``make_box``/``read_box``), and which
classes it holds (``holding_of``, ``held_classes``). ``papm_core.node`` computes on it.

A node's private training images are train minus the server's validation split, the
public reference set and the devices' held-out slices; its held-out images pick its
epochs and give the grouping statistics. No image the server sends carries a label.

Example: ``python -c "from papm_core.nodedata import held_classes; print(held_classes(10, 0, 3))"``
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import holdings
from .data import Dataset, Split, load_dataset
from .specialize import Carve, reference_splits
from .util import PapmError, atomic_write, file_sha256


@dataclass
class LocalData:
    private: Split      # private training images of every class this node can read
    val: Split          # this node's own held-out images of the same classes
    classes: list[str]  # class names of the source
    fingerprint: str = ""  # content hash of the node's data source (part of every model key)


@functools.lru_cache(maxsize=4)
def _local(source: str | None, split_json: str) -> tuple[Dataset, Carve]:
    ds = load_dataset(source)
    return ds, reference_splits(ds, json.loads(split_json))


BOX_KEYS = ("private_x", "private_y", "val_x", "val_y", "class_names")


def write_box(path: Path, private: Split, val: Split, class_names: list[str]) -> Path:
    """An edge box's data file (``.npz``, no pickled objects): its private training images
    and its own held-out images as uint8 NCHW with global int64 labels, plus all class names."""
    arrays = {"private_x": private.x.numpy(), "private_y": private.y.numpy(), "val_x": val.x.numpy(),
              "val_y": val.y.numpy(), "class_names": np.array(class_names, dtype=str)}

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
            np.savez(fh, **arrays)
    return atomic_write(Path(path), save)


@functools.lru_cache(maxsize=2)
def read_box(path: str) -> LocalData:
    """A box's data file, every array checked (keys, dtype, shape, label range)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in BOX_KEYS if k not in z.files]
            if missing:
                raise PapmError(f"box data {path} lacks {missing}; make it with 'papm shard'")
            a = {k: z[k] for k in BOX_KEYS}
    except (OSError, ValueError) as e:
        raise PapmError(f"cannot read box data {path}: {e}; make it with 'papm shard'") from e
    names = [str(c) for c in a["class_names"]]
    out = {}
    for part in ("private", "val"):
        x, y = a[f"{part}_x"], a[f"{part}_y"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != 3 or y.dtype != np.int64 or y.shape != x.shape[:1]:
            raise PapmError(f"box data {path}: {part} must be uint8 [n, 3, H, W] with int64 labels [n]")
        if len(y) and not (0 <= y.min() and y.max() < len(names)):
            raise PapmError(f"box data {path}: {part} labels outside 0..{len(names) - 1}")
        out[part] = Split(part, torch.from_numpy(x), torch.from_numpy(y), names)
    return LocalData(out["private"], out["val"], names, "box:" + file_sha256(path))


def local_data(source: str | None, split: dict, held: list[int] | None = None,
               holding: tuple[str, int, int, int] | None = None) -> LocalData:
    """The node's data; ``held`` (class ids) restricts it to the classes the node holds.
    A ``.npz`` source is an edge box's own data file (``write_box``); anything else is a
    data set that the node carves exactly as the server does (simulation). ``holding``
    (spec, node, nodes, seed; see ``papm_core.holdings``) first keeps only this simulated
    node's part of every split; it becomes part of the data's fingerprint."""
    if source and str(source).endswith(".npz"):
        box = read_box(str(source))
        private, val, classes, fp = box.private, box.val, box.classes, box.fingerprint
    else:
        ds, c = _local(source, json.dumps(split, sort_keys=True))
        private, val, classes, fp = c.private, c.node_val, ds.classes, ds.key
    if holding is not None and holding[2] > 1:  # one node holds everything: the same data, key
        spec, node, nodes, seed = holding
        p = holdings.shares(spec, nodes, len(classes), seed)
        private, val = (s.take(holdings.part(s.y, p, node, seed)) for s in (private, val))
        fp = f"{fp}|holdings={spec};node={node}/{nodes};seed={seed}"
    if held is not None:
        private, val = private.shard(held), val.shard(held)
    return LocalData(private, val, classes, fp)


def holding_of(data: LocalData) -> tuple[list[int], list[int]]:
    """(classes, training images of each) that a node with fixed data holds: the classes
    with training and held-out images."""
    counts = torch.bincount(data.private.y.cpu(), minlength=len(data.classes))
    present = set(data.val.y.unique().tolist())
    held = [c for c in range(len(data.classes)) if counts[c] > 0 and c in present]
    return held, [int(counts[c]) for c in held]


def make_box(path: Path, base_meta: dict, data: str | None, classes: list[int] | None,
             ref_size: int, node_val: float = 0.1) -> Path:
    """``papm shard``: an edge box's data file from a data set (the full one, or the box's
    own image tree). Images are carved by the base model's split exactly as the server
    carves its validation and public reference sets, so none of those reach a box; the
    box's held-out images are its own slice, as a simulated node's; labels become the base
    model's class ids (matched by class name)."""
    from .specialize import base_split

    names = list(base_meta.get("class_names") or [])
    ds = load_dataset(data)
    unknown = sorted(set(ds.classes) - set(names))
    if unknown:
        raise PapmError(f"classes {unknown} of {ds.source} are not classes of the base model")
    c = reference_splits(ds, base_split(base_meta, ref_size, node_val))
    private, val = c.private, c.node_val
    to_base = torch.tensor([names.index(c) for c in ds.classes], dtype=torch.int64)
    private, val = (Split(s.name, s.x, to_base[s.y], names) for s in (private, val))
    if classes is not None:
        bad = [c for c in classes if not 0 <= c < len(names)]
        if bad:
            raise PapmError(f"unknown class ids {bad}; valid ids are 0..{len(names) - 1}")
        private, val = private.shard(classes), val.shard(classes)
    if not len(private) or not len(val):
        raise PapmError(f"no images of classes {classes} in {ds.source}")
    return write_box(path, private, val, names)


def box_classes(source: str) -> list[int]:
    """The class ids an edge box holds: those with validation and training images."""
    return holding_of(read_box(str(source)))[0]


def held_classes(num_classes: int, partition: int, partitions: int, deal_seed: int = 0) -> list[int]:
    """Simulation: which classes node ``partition`` of ``partitions`` holds before grouping.
    Every class goes to exactly one node (a seeded deal); any deal gives the same grouping,
    because the statistics merge exactly."""
    if not 0 <= partition < partitions:
        raise PapmError(f"partition {partition} outside 0..{partitions - 1}")
    order = np.random.default_rng(deal_seed).permutation(num_classes) if deal_seed else np.arange(num_classes)
    return sorted(int(c) for c in order[partition::partitions])
