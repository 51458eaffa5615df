"""The fused system: train the head on device embeddings, and evaluate it in split mode.

``fuse_checkpoints`` loads the device checkpoints, rebuilds the base split they were pruned
from (recorded in each device checkpoint), embeds the public reference set (training),
the validation split (early stopping) and nothing else, trains the head and saves it.
``split_eval`` reports test accuracy overall, per class and with each single device
missing, per-device batch-1 latency measured on each model alone, head latency,
end-to-end latency (slowest device + head) and sizes, with the base model in the same run.

Examples::

    papm fuse --groups result/groups.json --devices 2 --ckpt-dir checkpoints --threshold 77
    papm eval --split checkpoints/fusion_n2_th77.pt --base checkpoints/base.pt
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .config import FuseConfig
from .data import load_dataset
from .embedding import cached_embed
from .evaluate import accuracy, head_latency_ms, latency_ms
from .fusion import head_accuracy, head_kind
from .models import count_params
from .specialize import output_name, reference_splits
from .util import PapmError, file_sha256


def resolve_ckpts(groups: list[list[int]], ckpt_dir: str, threshold: int) -> list[Path]:
    """Device checkpoints for a grouping, by the original naming; one line if any is missing."""
    paths = [Path(ckpt_dir) / f"{output_name(g, threshold / 100)}.pt" for g in groups]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PapmError(f"missing device checkpoints {missing}; run 'papm prune' for those groups")
    return paths


def load_devices(paths: list[Path]):
    models, metas = zip(*(checkpoint.load(p) for p in paths)) if paths else ((), ())
    bases = {m.get("base", {}).get("sha256") for m in metas}
    splits = {str(m.get("base", {}).get("split")) for m in metas}
    if len(bases) != 1 or len(splits) != 1 or None in bases:
        raise PapmError("the device checkpoints come from different (or unrecorded) base models; "
                        "prune them all from one base")
    return list(models), list(metas)


def system_data(metas: list[dict], data: str | None):
    info = metas[0]["base"]
    ds = load_dataset(data)
    if metas[0]["class_names"] != ds.classes:
        raise PapmError(f"device classes {metas[0]['class_names']} differ from the data's {ds.classes}")
    c = reference_splits(ds, {"ref_size": info.get("ref_size", 5000), **info["split"]})  # older files: ref_size beside
    return ds, c.ref, c.val


def features(paths, models, split) -> np.ndarray:
    return np.concatenate([cached_embed(p, m, split) for p, m in zip(paths, models)], axis=1)


def fuse_checkpoints(paths: list[Path], out: str | Path, data: str | None = None, cfg: FuseConfig | None = None,
             seed: int = 0, on_epoch=None) -> dict:
    """Train and save the fusion head for these device checkpoints, exactly as the federation
    does (``federation.train_heads``: selection half, then the gate half), one head seed; returns
    its summary."""
    from .config import to_dict
    from .federation import train_heads

    models, metas = load_devices(paths)
    ds, ref, val = system_data(metas, data)
    cfg = dataclasses.replace(cfg or FuseConfig(), head_seeds=1).validate()
    idx = range(len(paths))
    fz = train_heads({i: cached_embed(paths[i], models[i], ref) for i in idx},
              {i: cached_embed(paths[i], models[i], val) for i in idx}, ref, val, len(ds.classes), cfg, seed,
              {i: metas[i]["served_classes"] for i in idx}, on_epoch=on_epoch)
    res = fz.heads[fz.pick]
    devices = [{"path": str(p), "sha256": file_sha256(p), "dim": d, "classes": m["served_classes"]}
               for p, d, m in zip(paths, fz.dims, metas)]
    metrics = {"val_acc": res.best_val, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
               "prior_val": res.prior_val, "gain_z": res.gain_z, "head": head_kind(res), "gate": res.gate}
    checkpoint.save(out, res.head, kind="fusion", class_names=ds.classes, metrics=metrics,
                    config={**to_dict(cfg), "seed": seed, "reference_images": len(ref)},
                    extra={"devices": devices, "base": metas[0]["base"]})
    return {"path": str(out), **metrics, "devices": devices}


@dataclasses.dataclass
class FusedSystem:
    """A fusion head and the device models it was trained with, in its device order."""
    head: torch.nn.Module
    meta: dict         # the head's checkpoint metadata
    paths: list[Path]  # the device checkpoints
    models: list[torch.nn.Module]
    metas: list[dict]  # each device checkpoint's metadata


def load_system(head_path: str | Path, device_paths: list[str] | None = None) -> FusedSystem:
    """The head plus its device models; fails clearly if the devices do not match."""
    head, meta = checkpoint.load(head_path)
    if meta.get("kind") != "fusion":
        raise PapmError(f"{head_path} is a {meta.get('kind')} checkpoint, not a fusion head")
    expected = meta["devices"]
    paths = [Path(p) for p in (device_paths or [d["path"] for d in expected])]
    if len(paths) != len(expected):
        raise PapmError(f"the head expects {len(expected)} device models, got {len(paths)}")
    for p, d in zip(paths, expected):
        if not p.is_file() or file_sha256(p) != d["sha256"]:
            raise PapmError(f"device model {p} does not match the one the head was trained with "
                            f"({d['path']}, sha256 {d['sha256'][:12]}); re-run 'papm fuse'")
    models, metas = load_devices(paths)
    return FusedSystem(head, meta, paths, models, metas)


def split_eval(head_path: str | Path, base_path: str | Path | None = None, data: str | None = None,
               device_paths: list[str] | None = None, runs: int = 200) -> dict:
    """Split-mode figures of the fused system, with the base model in the same run."""
    system = load_system(head_path, device_paths)
    head, paths, models, metas = system.head, system.paths, system.models, system.metas
    ds, _, _ = system_data(metas, data)
    feats = torch.as_tensor(features(paths, models, ds.test))
    y = ds.test.y
    n = len(paths)
    full = head_accuracy(head, feats, y)
    missing = []
    for i in range(n):
        mask = torch.ones(len(y), n)
        mask[:, i] = 0.0
        missing.append(head_accuracy(head, feats, y, mask))
    with torch.no_grad():
        pred = head(feats).argmax(1)
    per_class = {c: 100.0 * (pred[y == k] == k).float().mean().item() for k, c in enumerate(ds.classes)}
    dev_lat = [latency_ms(m, runs)["median_ms"] for m in models]
    head_lat = head_latency_ms(head, feats[:1], runs=runs)
    res = {"devices": n, "test_acc": full, "test_per_class": per_class,
           "missing_one_worst": min(missing) if n > 1 else None,
           "missing_one_mean": float(np.mean(missing)) if n > 1 else None,
           "missing_one": missing, "device_latency_ms": dev_lat, "head_latency_ms": head_lat,
           "end_to_end_ms": max(dev_lat) + head_lat,
           "device_mb": [checkpoint.file_mb(p) for p in paths], "head_mb": checkpoint.file_mb(head_path),
           "device_params": [count_params(m) for m in models],
           "groups": [m["served_classes"] for m in metas], "threads": torch.get_num_threads()}
    if base_path:
        base, _ = checkpoint.load(base_path)
        acc = accuracy(base, ds.test)
        res["base"] = {"test_acc": acc.overall, "test_per_class": acc.per_class,
                       "latency_ms": latency_ms(base, runs)["median_ms"],
                       "mb": checkpoint.file_mb(base_path),
                       "params": count_params(base)}
    return res
