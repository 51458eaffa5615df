"""One device's model: score, search, slim, fine-tune, report: ``prune(base, data, cfg)``.

``device_data`` builds, from the base model's recorded split, exactly what one device
may read: its private class shard (train minus validation minus the public reference
set), a calibration set of its own classes, the public reference set and validation.
The Flower client calls ``prune`` with its local data; ``papm prune`` runs it centrally.

Example: ``papm prune --base checkpoints/base.pt --classes 3 5 --params-reduction 0.77 --epochs 20``
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn as nn

from . import budget, checkpoint
from .config import PruneConfig, to_dict
from .data import Dataset, Split, base_val_size, carve, fit_split, spread, train_val_split
from .evaluate import accuracy
from .finetune import finetune
from .loader import normalize
from .models import count_params, spec_params
from .prune import CRITERIA, apoz, channel_rank_keep, keep_by_threshold, search_keep, slim, units, weight_norms
from .util import PapmError, resolve_device, resolve_precision, write_json


@dataclass
class DeviceData:
    shard: Split       # the device's private training images of its own classes (global labels)
    calib: Split       # <= calib_size images of the shard, for APoZ
    val: Split         # the device's own held-out images of its classes (its epoch selection)
    ref: Split         # the server's public reference set (all classes; labels unused)
    pool: Split        # all private images of every class (scope 'all' only)


@dataclass
class Carve:
    """Every split of one data set, each with one job (docs: "One job per split")."""

    private: Split     # devices' training images (train - server val - public ref - node_val)
    node_val: Split    # devices' own held-out images: epoch selection, grouping statistics
    ref: Split         # the server's public reference set: distillation, head training
    val: Split         # the server's validation split: base checkpoint, fusion head


@dataclass
class PruneResult:
    model: nn.Module
    keep: dict[str, list[int]]
    report: dict
    path: Path | None = None


def base_split(base_meta: dict, ref_size: int = 5000, node_val: float = 0.1) -> dict:
    """The data split settings every stage reuses: the base model's (validation size, seed,
    per-class subsample) plus the public reference size and the devices' held-out share."""
    bcfg = base_meta.get("config", {})
    return {"val_size": int(bcfg.get("val_size", 5000)), "seed": int(bcfg.get("seed", 0)),
            "per_class": int(bcfg.get("per_class", 0)), "ref_size": int(ref_size),
            "node_val": float(node_val)}


def planned_split(ds: Dataset, tcfg, ref_size: int, node_val: float) -> dict:
    """The split settings a base trained per ``tcfg`` (a TrainConfig) on ``ds`` will carry,
    checked on ``ds`` before any training: a data set too small for the validation split,
    the public reference set and the devices fails here, in one line, not after the base."""
    split = {"val_size": base_val_size(ds.train, tcfg.val_size, tcfg.per_class), "seed": int(tcfg.seed),
             "per_class": int(tcfg.per_class),
             "ref_size": int(ref_size), "node_val": float(node_val)}
    reference_splits(ds, split)
    return split


def reference_splits(ds: Dataset, split: dict) -> Carve:
    """Every split of ``ds`` from the split settings (``base_split``), disjoint by construction."""
    pool, val = carve(ds.train, split["val_size"], split["seed"], split["per_class"])
    # the public reference set is the server's: fixed by the base split, not a device seed;
    # its size is a cap, as the validation split's (data.SPLIT_SHARE of the training images)
    n_ref = fit_split(int(split["ref_size"]), len(pool) + len(val))
    private, ref = train_val_split(pool, n_ref, split["seed"] + 1, "public reference size",
                                   "lower prune.ref_size (--ref-size)")
    share = float(split.get("node_val", 0.1))
    train, node_val = train_val_split(private, max(1, round(share * len(private))), split["seed"] + 2,
                                      "devices' held-out size", "the data has too few images per class for the devices")
    return Carve(train, Split("node_val", node_val.x, node_val.y, node_val.classes),
                 Split("ref", ref.x, ref.y, ref.classes), val)


def device_data(ds: Dataset, base_meta: dict, cfg: PruneConfig, device) -> DeviceData:
    bcfg = base_meta.get("config", {})
    if bcfg.get("classes"):
        raise PapmError("the base model was trained on a class subset; prune a base of all classes")
    bad = [c for c in cfg.classes if not 0 <= c < len(ds.classes)]
    if bad:
        raise PapmError(f"unknown class ids {bad}; valid ids are 0..{len(ds.classes) - 1}")
    c = reference_splits(ds, base_split(base_meta, cfg.ref_size, cfg.node_val))
    shard = c.private.shard(cfg.classes)
    # scope 'all' trains on every class, so it selects on held-out images of every class
    own_val = c.node_val if cfg.scope == "all" else c.node_val.shard(cfg.classes)
    to = lambda s: s.to(device)  # noqa: E731
    return DeviceData(to(shard), to(calibration(shard, cfg)), to(own_val), to(c.ref),
                      to(c.private) if cfg.scope == "all" else c.private)


def calibration(shard: Split, cfg: PruneConfig) -> Split:
    """At most ``calib_size`` images of the shard, spread evenly over its classes (APoZ)."""
    return spread(shard, cfg.calib_size, len(cfg.classes), cfg.seed)


def choose_keep(base: nn.Module, calib: Split, cfg: PruneConfig) -> tuple[dict, dict]:
    """Scores and the kept channels per unit for the configured search mode."""
    t0 = time.perf_counter()
    a = apoz(base, calib)
    norms = weight_norms(base)
    scores = CRITERIA[cfg.criterion](cfg)(a, norms)
    t1 = time.perf_counter()
    if cfg.search == "threshold":
        keep, thr = keep_by_threshold(a, cfg.threshold, cfg.min_channels), cfg.threshold
    elif cfg.search == "channel-rank":
        keep, thr = channel_rank_keep(a, cfg.params_reduction, cfg.min_channels)
    elif cfg.target_size_mb is not None:
        keep, thr = budget.fit_size(base, scores, cfg)
    elif cfg.target_latency_ms is not None:  # timed here: on an edge box, the box itself
        keep, thr, search = budget.fit_latency(base, scores, cfg, normalize(calib.x[:256].cpu()))
    else:
        keep, thr = search_keep(base, scores, cfg.params_reduction, cfg.min_channels, cfg.round_to)
    info = {"threshold": float(thr), "apoz": {k: _stats(v) for k, v in a.items()},
            "score_seconds": t1 - t0, "search_seconds": time.perf_counter() - t1}
    if cfg.target_latency_ms is not None:
        info["latency_search"] = search
    return keep, info


def _stats(v: np.ndarray) -> dict:
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def prune(base: nn.Module, data: DeviceData, cfg: PruneConfig, on_epoch=None,
          teacher_cache: Path | None = None) -> PruneResult:
    """Score, search, slim and fine-tune one device model; report its figures (no saving).
    ``teacher_cache``: folder for per-class teacher tables (``augment = "flip"``)."""
    cfg.validate()
    t0 = time.perf_counter()
    keep, info = choose_keep(base, data.calib, cfg)
    t1 = time.perf_counter()
    model = slim(base, keep)
    info["slim_seconds"] = time.perf_counter() - t1
    info["prune_seconds"] = time.perf_counter() - t0
    p0, p = spec_params(base.spec), count_params(model)
    ft = finetune(model, base, data.shard, data.val, cfg, ref=data.ref, pool=data.pool,
                  on_epoch=on_epoch, teacher_cache=teacher_cache) if cfg.epochs else None
    model = ft.model if ft else model
    layers = [{"unit": u.name, "kept": len(keep[u.name]), "total": u.width} for u in units(base)]
    report = {"classes": list(cfg.classes), "params": p, "base_params": p0,
              "reduction": 1 - p / p0, "target_reduction": cfg.params_reduction,
              "param_mb": checkpoint.param_mb(model), "layers": layers, **info,
              "finetune": {"best_val_loss": ft.best_val_loss, "best_val_own_acc": ft.best_val_acc,
                           "best_epoch": ft.best_epoch, "history": ft.history} if ft else None,
              "finetune_seconds": time.perf_counter() - t1 - info["slim_seconds"]}
    return PruneResult(model, keep, report)


def test_figures(model: nn.Module, test: Split, classes: list[int]) -> dict:
    """Reported test accuracy (never used for selection): overall, own classes, per class."""
    dev = next(model.parameters()).device
    whole = accuracy(model, test.to(dev))
    own = accuracy(model, test.shard(classes).to(dev))
    return {"test_acc": whole.overall, "test_own_acc": own.overall, "test_per_class": whole.per_class}


def output_name(classes: list[int], reduction: float) -> str:
    """The original project's naming: pruned_class3-5_th77."""
    return f"pruned_class{'-'.join(str(c) for c in classes)}_th{round(100 * reduction)}"


def save_device(path: Path, res: PruneResult, cfg: PruneConfig, class_names: list[str],
                base_info: dict, sidecar: dict) -> Path:
    """The device checkpoint (its architecture and weights, report, config, served classes,
    the base model's hash and data split, so fusion and export rebuild the same splits, and
    the precision it was fine-tuned in), then its JSON report beside it (``sidecar`` first);
    each written whole or not at all. Used by ``papm prune`` and by a node's store alike."""
    meta = dict(class_names=class_names, metrics=res.report, config=to_dict(cfg),
                extra={"served_classes": list(cfg.classes), "base": base_info,
                       "precision": dict(zip(("resolved", "why"),
                                             resolve_precision(resolve_device(cfg.device), cfg.precision)))})
    checkpoint.save(path, res.model, kind="pruned", **meta)
    res.report["file_mb"] = checkpoint.file_mb(path)
    write_json(path.with_suffix(".json"), {**sidecar, **res.report, "config": to_dict(cfg)})
    res.path = path
    return path


def save_result(res: PruneResult, cfg: PruneConfig, class_names: list[str], out_dir: str,
                base_info: dict | None = None) -> Path:
    """``papm prune``'s output: the device checkpoint under the original project's name."""
    exact = cfg.target_size_mb is None and cfg.target_latency_ms is None
    name = output_name(cfg.classes, cfg.params_reduction if exact else res.report["reduction"])
    path = Path(out_dir) / f"{name}.pt"
    return save_device(path, res, cfg, class_names, base_info or {}, {"checkpoint": str(path)})
