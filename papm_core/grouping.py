"""Device grouping from mergeable class statistics of the base model's predictions.

Clients compute ``class_stats(model, shard)``: per class, the count, the sum of the
softmax probability vectors, the sum of their outer products and the sum of the logit
vectors, all float64. These are sufficient statistics: ``merge_stats`` adds them, so
statistics of disjoint shards merge to exactly (to float rounding) what one party
holding all the data would compute. No image or per-sample output leaves a client.

``group_classes(stats, n)`` turns them into a class-similarity matrix and cuts an
average-linkage agglomerative clustering (scikit-learn, precomputed distance
``1 - similarity``) into n groups. Methods:

- ``correlation`` (default, after Hinton et al. 2015 §5.3): the correlation of the
  predicted probabilities across all samples, from the pooled covariance
  ``E[pp^T] - E[p]E[p]^T``; classes that are predicted together correlate.
- ``covariance``: cosine similarity between rows of that covariance matrix.
- ``mean-logit-cosine``: the original project's rule, cosine between class-mean logits
  (on the validation split here, not the test split).

Example: ``papm group --base checkpoints/base.pt --devices 2-10 --data ../shared/data/cifar10-jpeg75.tar.xz``
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint
from .data import Split, load_dataset
from .loader import batches
from .plots import dendrogram, heatmap
from .util import PapmError, atomic_write, file_sha256, provenance, resolve_device, write_json

METHODS = ("correlation", "covariance", "mean-logit-cosine")


@dataclass
class ClassStats:
    """Sufficient statistics over C classes (rows; absent classes are all zero)."""

    count: np.ndarray       # [C] images per class
    prob_sum: np.ndarray    # [C, K] sum of softmax vectors
    outer_sum: np.ndarray   # [C, K, K] sum of p p^T
    logit_sum: np.ndarray   # [C, K] sum of logits

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("count", "prob_sum", "outer_sum", "logit_sum")}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassStats":
        try:
            s = cls(*(np.asarray(d[k], dtype=np.float64)
                      for k in ("count", "prob_sum", "outer_sum", "logit_sum")))
        except (KeyError, TypeError, ValueError) as e:
            raise PapmError(f"malformed class statistics ({e})") from e
        return s.check()

    def check(self) -> "ClassStats":
        """Consistent shapes and possible values: all finite; counts and probability sums
        non-negative, and a class's probability mass equal to its count (softmax rows sum to 1)."""
        c, k = self.prob_sum.shape if self.prob_sum.ndim == 2 else (-1, -1)
        arrays = (self.count, self.prob_sum, self.outer_sum, self.logit_sum)
        if self.count.shape != (c,) or self.outer_sum.shape != (c, k, k) or self.logit_sum.shape != (c, k):
            raise PapmError("malformed class statistics: inconsistent shapes")
        if not all(np.isfinite(a).all() for a in arrays):
            raise PapmError("malformed class statistics: non-finite values")
        if (self.count < 0).any() or (self.prob_sum < 0).any() or (self.outer_sum < 0).any():
            raise PapmError("malformed class statistics: negative counts or probability sums")
        if not np.allclose(self.prob_sum.sum(1), self.count, rtol=1e-6, atol=1e-6):
            raise PapmError("malformed class statistics: probability sums do not match the counts")
        return self


@torch.no_grad()
def class_stats(model: nn.Module, shard: Split, batch_size: int = 500) -> ClassStats:
    """Statistics of the model's predictions on one shard, indexed by global class id."""
    model.eval()
    dev = next(model.parameters()).device
    n_classes = max(shard.class_ids) + 1 if shard.class_ids else 0
    k = model.num_classes
    n_classes = max(n_classes, k)
    count = np.zeros(n_classes)
    prob_sum, logit_sum = np.zeros((n_classes, k)), np.zeros((n_classes, k))
    outer_sum = np.zeros((n_classes, k, k))
    local_to_global = torch.tensor(shard.class_ids)
    for x, y in batches(shard.to(dev), batch_size, train=False):
        logits = model(x).double().cpu()
        p = torch.softmax(logits, 1)
        g = local_to_global[y.cpu()]
        for c in g.unique().tolist():
            m = g == c
            count[c] += int(m.sum())
            prob_sum[c] += p[m].sum(0).numpy()
            logit_sum[c] += logits[m].sum(0).numpy()
            outer_sum[c] += (p[m].T @ p[m]).numpy()
    return ClassStats(count, prob_sum, outer_sum, logit_sum)


def merge_stats(parts: list[ClassStats]) -> ClassStats:
    """Exact, associative merge: element-wise sums."""
    if not parts:
        raise PapmError("no class statistics to merge")
    shapes = {p.prob_sum.shape for p in parts}
    if len(shapes) != 1:
        raise PapmError(f"class statistics disagree in shape: {sorted(shapes)}")
    return ClassStats(*(sum(getattr(p, f) for p in parts)
                        for f in ("count", "prob_sum", "outer_sum", "logit_sum")))


def _cosine(rows: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(rows, axis=1, keepdims=True)
    u = rows / np.where(norm > 0, norm, 1)
    return u @ u.T


def similarity(stats: ClassStats, method: str = "correlation") -> np.ndarray:
    """Class-by-class similarity in [-1, 1] over the classes present in ``stats``."""
    if method not in METHODS:
        raise PapmError(f"unknown similarity method '{method}'; choose one of {', '.join(METHODS)}")
    present = stats.count > 0
    n = stats.count.sum()
    if n < 2:
        raise PapmError("class statistics cover fewer than 2 images")
    if method == "mean-logit-cosine":
        return _cosine(stats.logit_sum[present] / stats.count[present, None])
    mean = stats.prob_sum.sum(0) / n
    cov = stats.outer_sum.sum(0) / n - np.outer(mean, mean)
    cov = cov[np.ix_(present, present)]
    if method == "covariance":
        return _cosine(cov)
    sd = np.sqrt(np.clip(np.diag(cov), 1e-300, None))
    return np.clip(cov / np.outer(sd, sd), -1.0, 1.0)


def cluster(sim: np.ndarray, n_groups: int, max_group_size: int | None = None) -> list[list[int]]:
    """Average-linkage agglomerative clustering of a similarity matrix into n groups.

    Groups are sorted internally and by their smallest member, so output is canonical.
    """
    k = sim.shape[0]
    if not 1 <= n_groups <= k:
        raise PapmError(f"number of devices must lie in [1, {k}] (the number of classes), got {n_groups}")
    if n_groups == k:
        groups = [[i] for i in range(k)]
    elif n_groups == 1:
        groups = [list(range(k))]
    else:
        from sklearn.cluster import AgglomerativeClustering

        dist = np.clip(1.0 - (sim + sim.T) / 2, 0, None)
        np.fill_diagonal(dist, 0.0)
        labels = AgglomerativeClustering(n_clusters=n_groups, metric="precomputed",
                                         linkage="average").fit_predict(dist)
        groups = [sorted(np.flatnonzero(labels == g).tolist()) for g in range(n_groups)]
    if max_group_size:
        groups = _rebalance(groups, sim, max_group_size)
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


def _rebalance(groups: list[list[int]], sim: np.ndarray, cap: int) -> list[list[int]]:
    """Move the least-attached member of any group over ``cap`` into the most similar
    group with room, until every group fits."""
    if cap * len(groups) < sim.shape[0]:
        raise PapmError(f"{len(groups)} groups of at most {cap} classes cannot hold "
                        f"{sim.shape[0]} classes; raise max_group_size")
    groups = [list(g) for g in groups]
    while True:
        big = [g for g in groups if len(g) > cap]
        if not big:
            return groups
        g = max(big, key=len)
        member = min(g, key=lambda c: sim[c, [o for o in g if o != c]].mean())
        room = [h for h in groups if len(h) < cap]
        dest = max(room, key=lambda h: sim[member, h].mean())
        g.remove(member)
        dest.append(member)


def group_classes(stats: ClassStats, n_devices: int, method: str = "correlation",
                  max_group_size: int | None = None) -> list[list[int]]:
    """Groups of global class ids, one per device."""
    present = np.flatnonzero(stats.count > 0)
    sim = similarity(stats, method)
    return [[int(present[i]) for i in g] for g in cluster(sim, n_devices, max_group_size)]


def parse_devices(text: str) -> list[int]:
    """'2-10' -> [2..10]; '2,5,10' or '2 5 10' -> [2, 5, 10]."""
    out: list[int] = []
    try:
        for part in text.replace(",", " ").split():
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                if a > b:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise PapmError(f"cannot parse device counts '{text}'; use a range like 2-10 or a list like 2,5,10") from None
    if not out:
        raise PapmError("no device counts given")
    return sorted(set(out))


def run_grouping(base_path: str, devices: list[int], data: str | None, method: str = "correlation",
                 out_dir: str = "result", max_group_size: int | None = None,
                 device: str = "auto", ref_size: int = 5000, node_val: float = 0.1) -> dict:
    """``papm group``: stats on the devices' held-out images (the union of what the
    federation's nodes compute them on), groups for every N, then ``deploy_inf.csv``,
    ``groups.json``, the similarity heatmap and a dendrogram."""
    from .specialize import base_split, reference_splits

    dev = resolve_device(device)
    model, meta = checkpoint.load(base_path, dev)
    ds = load_dataset(data)
    if meta.get("class_names") != ds.classes:
        raise PapmError(f"base model classes {meta.get('class_names')} differ from the data's "
                        f"{ds.classes}; group with the data the base was trained on")
    bad = [n for n in devices if not 1 <= n <= len(ds.classes)]
    if bad:
        raise PapmError(f"device counts {bad} are outside [1, {len(ds.classes)}] (the number of classes)")
    # the images the federation's nodes hold out: never the server's validation or test split
    val = reference_splits(ds, base_split(meta, ref_size, node_val)).node_val
    stats = class_stats(model, val)
    sim = similarity(stats, method)
    groups = {n: group_classes(stats, n, method, max_group_size) for n in devices}
    out = Path(out_dir)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["devices", "groups", "group_names"])
    for n, g in groups.items():
        w.writerow([n, str(g), str([[ds.classes[c] for c in grp] for grp in g])])
    atomic_write(out / "deploy_inf.csv", lambda p: p.write_text(buf.getvalue()))
    result = {"base": str(base_path), "base_sha256": file_sha256(base_path), "method": method,
              "split": "node_val", "val_images": len(val), "classes": ds.classes,
              "max_group_size": max_group_size, "similarity": sim.tolist(),
              "groups": {str(n): g for n, g in groups.items()}, "provenance": provenance()}
    write_json(out / "groups.json", result)
    heatmap(sim, ds.classes, out / "similarity.png", f"class similarity ({method}, devices' held-out images)")
    dendrogram(sim, ds.classes, out / "dendrogram.png", f"average linkage on 1 - {method}")
    return result


def read_groups(path) -> dict[int, list[list[int]]]:
    """Read ``groups.json`` back: {N: groups}."""
    try:
        d = json.loads(Path(path).read_text())
        return {int(n): [[int(c) for c in g] for g in gs] for n, gs in d["groups"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PapmError(f"cannot read groups file {path} ({e}); rerun 'papm group'") from e
