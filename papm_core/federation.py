"""Server-side steps of the federated protocol, without Flower: the server's public data,
matching groups to nodes, the fusion head from uploaded embeddings, and the fused
system's figures from uploaded test embeddings. ``strategies/papm.py`` calls these.

The server holds the base model and three public sets carved exactly as ``papm prune``
carves them: the reference set (the head's training data, sent to nodes to embed), the
validation split (selection and early stopping) and the test split (reported figures
only). A device missing from a round is absent from ``embeddings``; the head is built
over the devices that delivered reference embeddings, and at test time a device that
did not answer is masked, never replaced by made-up features.

Example: ``python -c "from papm_core.federation import match_groups; print(match_groups([[0], [1]], [[1], [0]]))"``
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .config import FuseConfig, to_dict
from .data import Dataset, Split, load_dataset
from .fusion import FuseResult, FusionHead, gate, halves, head_accuracy, head_predictions, train_head
from .specialize import reference_splits
from .util import PapmError


def server_data(source: str | None, split: dict) -> tuple[Dataset, Split, Split]:
    """(dataset, public reference set, validation split) for the base model's split."""
    ds = load_dataset(source)
    c = reference_splits(ds, split)
    return ds, c.ref, c.val


def match_groups(groups: list[list[int]], held: list[dict[int, int]] | None) -> list[int]:
    """Which group each node serves. Simulated nodes that hold whatever shard they are given
    (``held`` None): node i serves group i. Nodes with fixed data (``held``: class -> its
    training images there): each group goes to the node holding most images of its classes
    (greedy, ties to the lower group and node index)."""
    if held is None:
        return list(range(len(groups)))
    if len(held) != len(groups):
        raise PapmError(f"{len(held)} nodes for {len(groups)} groups")
    pairs = sorted((-sum(h.get(c, 0) for c in g), gi, ni) for gi, g in enumerate(groups)
                   for ni, h in enumerate(held))
    out, used_g, used_n = [-1] * len(held), set(), set()
    for _, gi, ni in pairs:
        if gi not in used_g and ni not in used_n:
            out[ni] = gi
            used_g.add(gi)
            used_n.add(ni)
    return out


def stack(feats: dict[int, np.ndarray], order: list[int], dims: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate per-device features in head order; a missing device is zeros + mask 0."""
    cols, mask = [], torch.ones(n, len(order))
    for j, (i, d) in enumerate(zip(order, dims)):
        f = feats.get(i)
        if f is None:
            cols.append(torch.zeros(n, d))
            mask[:, j] = 0.0
        else:
            if f.shape != (n, d):
                raise PapmError(f"device {i} sent embeddings of shape {f.shape}, expected {(n, d)}")
            cols.append(torch.as_tensor(f, dtype=torch.float32))
    return torch.cat(cols, 1), mask


@dataclass
class Fused:
    heads: list[FuseResult]  # one per head seed, each gated; ``pick`` is the one used
    pick: int
    order: list[int]         # the devices the head reads, in its order
    dims: list[int]          # their embedding widths

    @property
    def head(self) -> FusionHead:
        return self.heads[self.pick].head


def train_heads(ref_feats: dict[int, np.ndarray], val_feats: dict[int, np.ndarray], ref: Split, val: Split,
                num_classes: int, cfg: FuseConfig, seed: int, owners: dict[int, list[int]], on_epoch=None) -> Fused:
    """``cfg.head_seeds`` heads over the devices that sent reference and validation embeddings.
    The validation split's selection half picks each head's epoch and then the seed; its
    gate half decides whether the picked head keeps its MLP (``fusion.gate``). ``owners``:
    the classes each device serves (the head's specialist prior)."""
    order = sorted(set(ref_feats) & set(val_feats))
    if not order:
        raise PapmError("no device delivered embeddings; nothing to fuse")
    dims = [ref_feats[i].shape[1] for i in order]
    xr, _ = stack(ref_feats, order, dims, len(ref))
    xv, _ = stack(val_feats, order, dims, len(val))
    vy = val.y.cpu().numpy()
    sel, held = halves(vy)
    heads = [train_head(xr.numpy(), ref.y.cpu().numpy(), xv[sel].numpy(), vy[sel], dims, num_classes, cfg,
                        seed + k, [owners[i] for i in order] if cfg.prior == "owner" else None, on_epoch)
             for k in range(cfg.head_seeds)]  # device models fixed; only the head's seed varies
    pick = max(range(len(heads)), key=lambda k: (heads[k].best_val, -k))
    for res in heads:  # every seed's head as the product would keep it, so their spread is the head's
        gate(res, xv[held].numpy(), vy[held], cfg.min_gain_z)
    return Fused(heads, pick, order, dims)


def save_head(path: Path, head: FusionHead, class_names: list[str], devices: list[dict],
              cfg: FuseConfig, metrics: dict, base: dict) -> Path:
    """The head in the project's checkpoint format, naming the device models it expects."""
    return checkpoint.save(path, head, kind="fusion", class_names=class_names, metrics=metrics,
                           config=to_dict(cfg), extra={"devices": devices, "base": base})


def fused_figures(head: FusionHead, order: list[int], dims: list[int],
                  test_feats: dict[int, np.ndarray], y: torch.Tensor, class_names: list[str]) -> dict:
    """Test accuracy overall and per class (devices that did not answer are masked), and
    with each single device of the head masked as well: the worst and the mean."""
    x, mask = stack(test_feats, order, dims, len(y))
    pred = head_predictions(head, x, mask)
    per_class = {c: 100.0 * (pred[y == k] == k).float().mean().item() for k, c in enumerate(class_names)}
    missing = []
    for j in range(len(order)):
        m = mask.clone()
        m[:, j] = 0.0
        if m.sum(1).min() > 0:
            missing.append(head_accuracy(head, x, y, m))
    return {"test_acc": 100.0 * (pred == y).float().mean().item(), "test_per_class": per_class,
            "masked_at_test": [order[j] for j in range(len(order)) if mask[0, j] == 0],
            "missing_one": missing, "missing_one_worst": min(missing) if missing else None,
            "missing_one_mean": float(np.mean(missing)) if missing else None}


def _log_probs(feats: np.ndarray, k: int) -> np.ndarray:
    return feats[:, -k:]  # a device embedding ends with its own K log-probabilities


def fleet_figures(val_feats: dict[int, np.ndarray], test_feats: dict[int, np.ndarray], val_y: torch.Tensor,
                  test_y: torch.Tensor, k: int) -> dict:
    """The fleet against its own members. Each device model is a K-class classifier too:
    its accuracy on the server's validation images (the devices never selected on them)
    picks the best single device, whose test accuracy is reported; the plain average of
    the devices' probabilities is the untrained alternative to the head."""
    vy, ty = val_y.cpu().numpy(), test_y.cpu().numpy()
    both = sorted(set(val_feats) & set(test_feats))
    val_acc = {d: 100.0 * float((_log_probs(val_feats[d], k).argmax(1) == vy).mean()) for d in both}
    test_acc = {d: 100.0 * float((_log_probs(test_feats[d], k).argmax(1) == ty).mean()) for d in both}
    if not both:
        return {"device_val_acc": {}}
    best = max(both, key=lambda d: (val_acc[d], -d))

    def average(feats, y):
        p = np.mean([np.exp(_log_probs(feats[d], k)) for d in both], 0)
        return 100.0 * float((p.argmax(1) == y).mean())
    return {"device_val_acc": val_acc, "best_single_device": best, "best_single_val_acc": val_acc[best],
            "best_single_test_acc": test_acc[best], "average_val_acc": average(val_feats, vy),
            "average_test_acc": average(test_feats, ty)}


def device_figures(pred: np.ndarray, y: torch.Tensor, classes: list[int]) -> dict:
    """A device model's own test accuracy: on its classes, and over all classes."""
    p = torch.as_tensor(pred)
    own = torch.isin(y, torch.tensor(classes))
    return {"test_own_acc": 100.0 * (p[own] == y[own]).float().mean().item(),
            "test_acc": 100.0 * (p == y).float().mean().item()}
