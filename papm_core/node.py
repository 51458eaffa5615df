"""What one edge node computes, without Flower: local class statistics, a cached pruned
model, embeddings, and its own batch-1 latency. ``clients/app.py`` calls these, on the
data the node holds (``papm_core.nodedata.LocalData``).

The node keeps its pruned models in a node-local store (``<store>/pruned/<key>.pt``).
The key hashes the base model, the classes, every pruning setting and the content of
the node's data, so a model is built once and reused by every run that needs it (any N,
any rerun) and never by a run on other data.

Example: ``python -c "from papm_core.node import prune_key; print(prune_key('ab', [3, 5], {}, {}))"``
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint
from .config import PruneConfig, to_dict
from .data import Split
from .embedding import cached_embed
from .evaluate import LATENCY_METHOD, latency_ms
from .grouping import ClassStats, class_stats
from .models import count_params
from .nodedata import LocalData
from .specialize import DeviceData, calibration, prune, save_device
from .util import PapmError, file_sha256, write_json


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
    save_device(path, res, cfg, data.classes, {"sha256": base_sha, "split": split}, {"key": key})
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
            "latency_reused": lat["reused"], "params": count_params(model),
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
