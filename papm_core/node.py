"""What one edge node computes, without Flower: local class statistics, a cached pruned
model, embeddings, and its own batch-1 latency. ``clients/app.py`` calls these.

A node's data is ``LocalData``: its private training images (train minus the server's
validation split, the public reference set and the devices' held-out slices, exactly as
``papm prune`` carves them) and its own held-out images of the same classes, which pick
its epochs and give the grouping statistics. No image the server sends carries a label.
In simulation every node reads the same source and keeps only the classes it holds; on
an edge box the source is its own data file (``papm shard``).

The node keeps its pruned models in a node-local store (``<store>/pruned/<key>.pt``).
The key hashes the base model, the classes, every pruning setting and the content of
the node's data, so a model is built once and reused by every run that needs it (any N,
any rerun) and never by a run on other data.

Example: ``python -c "from papm_core.node import prune_key; print(prune_key('ab', [3, 5], {}, {}))"``
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint, holdings
from .config import PruneConfig, to_dict
from .data import Dataset, Split, load_dataset
from .evaluate import LATENCY_METHOD, latency_ms
from .fusion import cached_embed
from .grouping import ClassStats, class_stats
from .specialize import Carve, DeviceData, calibration, prune, reference_splits
from .util import PapmError, atomic_write, file_sha256, write_json


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


def local_stats(base: nn.Module, data: LocalData, classes: list[int]) -> ClassStats:
    """Class statistics of the base model's predictions on this node's held-out images
    (never in the base model's training set, so the predictions are not overfit)."""
    present = [c for c in classes if c in set(data.val.y.unique().tolist())]
    if not present:
        raise PapmError(f"this node holds no validation images of classes {classes}")
    return class_stats(base, data.val.shard(present))


def prune_key(base_sha: str, classes: list[int], prune_cfg: dict, split: dict, data_fp: str) -> str:
    """Content key of one device model: base, classes, settings (device/out paths excluded)
    and the content hash of the node's data (``LocalData.fingerprint``)."""
    cfg = {k: v for k, v in prune_cfg.items() if k not in ("device", "out_dir", "data", "classes")}
    for k, unset in (("target_latency_ms", None), ("runtime", "torch")):  # settings newer than the store:
        if cfg.get(k, unset) == unset:  # left at their defaults, they keep the models built before them
            cfg.pop(k, None)
    blob = json.dumps({"base": base_sha, "classes": sorted(classes), "cfg": cfg, "split": split,
                       "data": data_fp}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _pruned_path(store: Path, key: str) -> Path:
    return Path(store) / "pruned" / f"{key}.pt"


def ensure_pruned(base: nn.Module, base_sha: str, data: LocalData, cfg: PruneConfig, split: dict,
                  public: dict[str, Split], store: Path, on_epoch=None) -> tuple[Path, dict, bool]:
    """The node's pruned model for ``cfg.classes``: loaded from the store when built before,
    else pruned, fine-tuned and saved atomically. Returns (path, report, reused)."""
    key = prune_key(base_sha, cfg.classes, to_dict(cfg), split, data.fingerprint)
    path = _pruned_path(store, key)
    if path.is_file():
        try:
            _, meta = checkpoint.read(path)
            return path, meta["metrics"], True
        except PapmError:
            pass  # a damaged file is rebuilt; a half-written one never exists (atomic save)
    dev = next(base.parameters()).device
    shard = data.private.shard(cfg.classes)
    val = data.val if cfg.scope == "all" else data.val.shard(cfg.classes)  # never the server's
    ref = public.get("ref")
    if cfg.scope == "shard+public" and ref is None:
        raise PapmError("scope shard+public needs the public reference set in the message")
    dd = DeviceData(shard.to(dev), calibration(shard, cfg).to(dev), val.to(dev),
                    ref.to(dev) if ref is not None else None,
                    data.private.to(dev) if cfg.scope == "all" else data.private)
    res = prune(base, dd, cfg, on_epoch=on_epoch, teacher_cache=Path(store) / "teacher")
    res.report["key"] = key
    checkpoint.save(path, res.model, kind="pruned", class_names=data.classes, metrics=res.report,
                    config=to_dict(cfg), extra={"served_classes": list(cfg.classes),
                                                "base": {"sha256": base_sha, "split": split}})
    res.report["file_mb"] = checkpoint.file_mb(path)
    write_json(path.with_suffix(".json"), {"key": key, **res.report})
    return path, res.report, False


def find_pruned(store: Path, key: str) -> Path:
    path = _pruned_path(store, key)
    if not path.is_file():
        raise PapmError(f"this node has no pruned model {key}; run the prune round first")
    return path


def embed_images(path: Path, x: np.ndarray, store: Path) -> np.ndarray:
    """Frozen embeddings of uint8 images [n, 3, H, W], cached by (model sha256, images)."""
    model, _ = checkpoint.load(path)
    images = Split("public", torch.as_tensor(x), torch.zeros(len(x), dtype=torch.long), [])
    return cached_embed(path, model, images, root=Path(store) / "embeddings")


@contextlib.contextmanager
def machine_lock(store: Path, exclusive: bool):
    """Nodes with one store share one machine (simulated nodes run side by side): a latency
    is timed under the exclusive lock while other nodes' work holds it shared, so no timing
    overlaps another node's compute. Released when the process dies, even by SIGKILL."""
    try:
        import fcntl
    except ImportError:  # not POSIX: nodes on one machine then time side by side
        yield
        return
    path = Path(store) / "machine.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def evaluate_images(path: Path, x: np.ndarray, store: Path, runs: int = 200,
                    calib=None) -> dict:
    """Embeddings and the device model's own predictions for images the server asks about,
    plus this node's median batch-1 latency in ms, measured here on the model alone in the
    runtime it was pruned for (its config's ``runtime``). ``calib()`` gives the node's own
    training images for an int8 runtime's calibration (never the server's images)."""
    model, meta = checkpoint.load(path)
    runtime = str(meta.get("config", {}).get("runtime", "torch"))
    images = Split("test", torch.as_tensor(x), torch.zeros(len(x), dtype=torch.long), [])
    with machine_lock(store, exclusive=False):
        feats = cached_embed(path, model, images, root=Path(store) / "embeddings")
        with torch.no_grad():
            # the embedding ends with the model's own log-probabilities
            pred = feats[:, model.num_features:].argmax(1).astype(np.int64)
    sha = file_sha256(path)
    served = list(meta.get("served_classes", []))
    lat = cached_latency(model, sha, store, runs, runtime, (lambda: calib(served)) if calib else None)
    return {"features": feats, "pred": pred, "latency_ms": lat["median_ms"],
            "latency_p90_ms": lat["p90_ms"], "latency_blocks_ms": lat.get("block_medians_ms"),
            "latency_method": lat.get("method"), "threads": lat["threads"], "runtime": runtime,
            "latency_reused": lat["reused"], "params": sum(p.numel() for p in model.parameters()),
            "file_mb": checkpoint.file_mb(path), "sha256": sha,
            "classes": meta.get("served_classes", [])}


def cached_latency(model: nn.Module, sha: str, store: Path, runs: int = 200, runtime: str = "torch",
                   calib=None) -> dict:
    """This node's batch-1 latency of the model with file hash ``sha`` in ``runtime``, timed
    once per (model, torch threads, runs, method, runtime) and kept in the store: every
    device count that reuses a model reuses its timing. Timing is serialised across the
    machine's nodes (5 blocks of ``runs`` runs each)."""
    tag = "" if runtime == "torch" else f"-{runtime}"
    name = f"{sha[:32]}-t{torch.get_num_threads()}-r{runs}-{LATENCY_METHOD}{tag}.json"
    path = Path(store) / "latency" / name
    if path.is_file():
        try:
            return {**json.loads(path.read_text()), "reused": True}
        except (OSError, ValueError):
            pass  # unreadable: timed again below and rewritten whole
    with machine_lock(store, exclusive=True):
        if runtime == "torch":
            lat = latency_ms(model, runs)
        else:
            from .export import runtime_latency_ms  # onnx is an optional extra

            lat = runtime_latency_ms(model, runtime, calib() if calib else None, runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, lat)
    return {**lat, "reused": False}
