"""Fusion head over frozen device embeddings, with device dropout: ``train_head(...) -> FuseResult``.

Devices upload only embeddings of the server's public reference set (``papm_core.embedding``:
per image, pooled features and their own classifier's log-probabilities over all classes);
the server trains the head on them, stops early on validation embeddings and reports on
test embeddings.

The head (``FusionHead``) normalises each device's embedding with its own BatchNorm,
multiplies it by that device's presence mask (0 = missing), rescales the present
blocks by N / n_present (as inverted dropout does) and appends the mask itself, then
applies an MLP (Linear-BN-ReLU-Dropout-Linear). With ``prior = "owner"`` (the default)
the MLP's output is added to a parameter-free specialist prior: each class's score is the
mean log-probability that the devices serving that class give it (``owner_prior``), and
the MLP's last layer starts at zero, so training begins from the prior. The server's
validation split is cut in two halves (``halves``), each with one job: the selection half
picks the head's epoch (the prior alone is epoch 0) and seed; the gate half, which picked
neither, decides whether the trained MLP is kept over the prior alone (``gate``). Training masks whole devices at random
(``device_dropout``); inference masks a missing device exactly the same way (a class
whose devices are all missing is scored by every present device), so training and
inference follow one code path and no features are made up.

Example: ``papm fuse --ckpts checkpoints/pruned_class0-1-8-9_th77.pt checkpoints/pruned_class2-3-4-5-6-7_th77.pt``
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import FuseConfig
from .embedding import device_embedding
from .util import PapmError


class FusionHead(nn.Module):
    """MLP over masked, per-device-normalised embeddings; its spec is plain JSON."""

    def __init__(self, spec: dict):
        super().__init__()
        try:
            self.dims = [int(d) for d in spec["dims"]]
            hidden, k, p = int(spec["hidden"]), int(spec["num_classes"]), float(spec["dropout"])
        except (KeyError, TypeError, ValueError) as e:
            raise PapmError(f"invalid fusion-head spec {spec}: {e}") from e
        self.spec = dict(spec)
        self.norms = nn.ModuleList(nn.BatchNorm1d(d) for d in self.dims)
        n = len(self.dims)
        self.mlp = nn.Sequential(nn.Linear(sum(self.dims) + n, hidden), nn.BatchNorm1d(hidden),
                                 nn.ReLU(inplace=True), nn.Dropout(p), nn.Linear(hidden, k))
        owners = spec.get("owners")  # the classes each device serves; None = no prior
        self.k = k
        if owners is not None:
            if len(owners) != n or any(d <= k for d in self.dims) or \
                    any(not 0 <= int(c) < k for g in owners for c in g):
                raise PapmError(f"invalid fusion-head spec: owners {owners} do not fit {n} devices, "
                                f"widths {self.dims} and {k} classes")
            own = torch.zeros(n, k)
            for i, g in enumerate(owners):
                own[i, [int(c) for c in g]] = 1.0
            self.register_buffer("owner", own, persistent=False)  # rebuilt from the spec on load
            nn.init.zeros_(self.mlp[-1].weight)  # start from the prior (a loaded state overwrites)
            nn.init.zeros_(self.mlp[-1].bias)
        else:
            self.owner = None

    def combine(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[n, sum(dims)] embeddings + [n, N] presence mask -> the MLP's input."""
        parts, start = [], 0
        scale = len(self.dims) / mask.sum(1, keepdim=True).clamp(min=1)
        for i, (d, bn) in enumerate(zip(self.dims, self.norms)):
            parts.append(bn(feats[:, start:start + d]) * (mask[:, i:i + 1] * scale))
            start += d
        return torch.cat(parts + [mask], 1)

    def owner_prior(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[n, K]: each class's mean log-probability over the present devices that serve it;
        over every present device where all of its own devices are missing."""
        ends = torch.tensor(self.dims).cumsum(0).tolist()
        logp = torch.stack([feats[:, e - self.k:e] for e in ends], 1)  # [n, N, K]
        present = mask[:, :, None].expand_as(logp)
        own = present * self.owner
        w = torch.where(own.sum(1, keepdim=True) > 0, own, present)
        return (w * logp).sum(1) / w.sum(1).clamp(min=1e-12)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones(feats.shape[0], len(self.dims), device=feats.device)
        out = self.mlp(self.combine(feats, mask))
        return out if self.owner is None else out + self.owner_prior(feats, mask)


def build_head(dims: list[int], num_classes: int, hidden: int = 512, dropout: float = 0.3,
               owners: list[list[int]] | None = None) -> FusionHead:
    """``dims``: each device's embedding width (features + K log-probabilities);
    ``owners``: the classes each device serves, for the specialist prior (None: MLP only)."""
    spec = {"arch": "fusion-mlp", "dims": list(dims), "num_classes": num_classes,
            "hidden": hidden, "dropout": dropout}
    if owners is not None:
        spec["owners"] = [sorted(int(c) for c in g) for g in owners]
    return FusionHead(spec)


@torch.no_grad()
def fused_logits(head: FusionHead, models: list[nn.Module], x: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """The live path: normalised images through every device extractor, then the head."""
    head.eval()
    feats = torch.cat([device_embedding(m.eval(), x) for m in models], 1)
    return head(feats, mask)


def random_mask(n: int, n_dev: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """Drop each device with probability p per sample, keeping at least one present."""
    mask = (torch.rand(n, n_dev, generator=gen) >= p).float()
    empty = mask.sum(1) == 0
    if empty.any():
        keep = torch.randint(0, n_dev, (int(empty.sum()),), generator=gen)
        mask[empty.nonzero().flatten(), keep] = 1.0
    return mask


@dataclass
class FuseResult:
    head: FusionHead
    best_val: float                  # accuracy on the selection half at the selected epoch
    best_epoch: int                  # 0: the prior alone was selected
    epochs_run: int
    history: list[dict]
    prior_val: float | None = None   # selection-half accuracy of the prior alone (owners given)
    gain_z: float | None = None      # paired z of the MLP's gain over the prior, on the gate half
    kept_mlp: bool = True            # False: the gate put the prior alone back
    gate: dict | None = None         # gate-half figures: images, prior %, prior + MLP %


def head_kind(res: FuseResult) -> str:
    """What the trained head is: "MLP" (no prior), "prior" (alone) or "prior + MLP"."""
    if res.prior_val is None:
        return "MLP"
    return "prior + MLP" if res.best_epoch > 0 and res.kept_mlp else "prior"


def halves(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint, class-stratified halves of the indices of ``y`` (selection, gate)."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        a.append(idx[:(len(idx) + 1) // 2])
        b.append(idx[(len(idx) + 1) // 2:])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


def paired_gain_z(old: torch.Tensor, new: torch.Tensor, y: torch.Tensor) -> float:
    """McNemar's z for "new predictions beat old ones" on the same images: (b - c) / sqrt(b + c),
    b = images only ``new`` gets right, c = images only ``old`` gets right; 0 when they agree."""
    b = int(((new == y) & (old != y)).sum())
    c = int(((old == y) & (new != y)).sum())
    return 0.0 if b + c == 0 else (b - c) / (b + c) ** 0.5


@torch.no_grad()
def head_predictions(head: FusionHead, feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    head.eval()
    return torch.cat([head(feats[i:i + 2048], None if mask is None else mask[i:i + 2048]).argmax(1)
                      for i in range(0, len(feats), 2048)])


def head_accuracy(head: FusionHead, feats: torch.Tensor, y: torch.Tensor,
                  mask: torch.Tensor | None = None) -> float:
    return 100.0 * (head_predictions(head, feats, mask) == y).float().mean().item()


def train_head(train_f: np.ndarray, train_y: np.ndarray, val_f: np.ndarray, val_y: np.ndarray,
               dims: list[int], num_classes: int, cfg: FuseConfig, seed: int = 0,
               owners: list[list[int]] | None = None, on_epoch=None) -> FuseResult:
    """Adam on the reference embeddings; early stopping on validation accuracy (the
    selection half), by ``cfg`` (epochs, batch size, lr, patience, device dropout, hidden
    width, dropout). With ``owners`` (the specialist prior) the untrained head, which is
    the prior alone, is validated first as epoch 0 and can be selected like any epoch;
    whether a trained MLP is then kept is ``gate``'s decision, on other images."""
    if sum(dims) != train_f.shape[1] or sum(dims) != val_f.shape[1]:
        raise PapmError(f"embedding widths {train_f.shape[1]}/{val_f.shape[1]} do not match "
                        f"the devices' dims {dims}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head = build_head(dims, num_classes, cfg.hidden, cfg.dropout, owners)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    xf, yf = torch.as_tensor(train_f), torch.as_tensor(train_y)
    vf, vy = torch.as_tensor(val_f), torch.as_tensor(val_y)
    best = {"val": -1.0, "epoch": 0, "state": None}
    if owners is not None:
        best["val"], best["state"] = head_accuracy(head, vf, vy), copy.deepcopy(head.state_dict())
    prior = dict(best) if owners is not None else None
    history, bad = [], 0
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        order = torch.randperm(len(xf), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            mask = random_mask(len(idx), len(dims), cfg.device_dropout, gen)
            loss = F.cross_entropy(head(xf[idx], mask), yf[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val = head_accuracy(head, vf, vy)
        history.append({"epoch": epoch, "val_acc": val})
        if on_epoch:
            on_epoch(history[-1])
        if val > best["val"]:
            best, bad = {"val": val, "epoch": epoch, "state": copy.deepcopy(head.state_dict())}, 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    head.load_state_dict(best["state"])
    return FuseResult(head.eval(), best["val"], best["epoch"], len(history), history,
                      prior["val"] if prior else None)


@torch.no_grad()
def gate(res: FuseResult, gate_f: np.ndarray, gate_y: np.ndarray, min_gain_z: float) -> FuseResult:
    """Keep the selected MLP over the prior alone only if it is significantly better on the
    gate half, images that picked neither its epoch nor its seed: McNemar's paired z
    (``paired_gain_z``) of at least ``min_gain_z`` (1.645: one-sided 5 %). Otherwise the
    MLP's output layer is zeroed, which leaves the prior exactly. Changes ``res`` in place."""
    if res.prior_val is None or res.best_epoch == 0:
        return res
    gf, gy = torch.as_tensor(gate_f), torch.as_tensor(gate_y)
    res.head.eval()
    trained = head_predictions(res.head, gf)
    prior = res.head.owner_prior(gf, torch.ones(len(gf), len(res.head.dims))).argmax(1)
    res.gain_z = paired_gain_z(prior, trained, gy)
    res.gate = {"images": len(gy), "prior_acc": 100.0 * (prior == gy).float().mean().item(),
                "mlp_acc": 100.0 * (trained == gy).float().mean().item(), "min_gain_z": min_gain_z}
    res.kept_mlp = res.gain_z >= min_gain_z
    if not res.kept_mlp:
        res.head.mlp[-1].weight.zero_()
        res.head.mlp[-1].bias.zero_()
    return res
