"""Fine-tune a pruned device model within a data scope: ``finetune(...) -> FinetuneResult``.

Scopes say exactly which data the device reads:

- ``shard``: only the device's own class shard; cross-entropy on it.
- ``shard+public`` (default): the shard with cross-entropy, plus distillation from the
  unpruned base model (KL at temperature T, scaled by T^2) on both the shard batch and
  a batch of the server's public reference set of all classes. The base model's soft
  targets keep the embedding useful for every class, which the fusion head needs.
- ``all``: centralised data of every class. Recipe ``papm``: cross-entropy plus
  distillation. Recipe ``original`` reproduces the original project: 10-class
  cross-entropy, 9:1 sampling of own versus other classes, 5x class weights on own
  classes; an epoch draws len(shard)/0.9 images so own images are seen about once.

Selection uses the server-held validation split. Scope ``shard`` selects on the
device's own classes only; ``shard+public`` and ``all`` train the device to answer for
every class (through distillation or labels), so they select on 10-class accuracy. Own-
class accuracy alone cannot select a one-class device: predicting that class always
scores 100 %, so the untrained slimmed model would win. Ties go to the later epoch.

Example: ``papm prune --base checkpoints/base.pt --classes 3 5 --scope shard+public``
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PruneConfig
from .data import Split
from .evaluate import accuracy
from .loader import batches, num_batches
from .train import make_optimizer
from .util import autocast


@dataclass
class FinetuneResult:
    model: nn.Module
    best_val: float
    best_epoch: int
    history: list[dict]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1),
                    reduction="batchmean") * t * t


def _cycle(split: Split, bs: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from batches(split, bs, train=True, gen=gen, channels_last=True)


def _original_order(pool: Split, own: list[int], n_shard: int, gen: torch.Generator) -> torch.Tensor:
    """Indices for one epoch of 9:1 own-vs-other weighted sampling (with replacement)."""
    is_own = torch.isin(pool.y.cpu(), torch.tensor(own))
    w = torch.where(is_own, 0.9 / max(1, int(is_own.sum())), 0.1 / max(1, int((~is_own).sum())))
    return torch.multinomial(w, max(1, int(n_shard / 0.9)), replacement=True, generator=gen)


def _loss_fn(cfg: PruneConfig, base: nn.Module, own: list[int], n_classes: int, dev) -> Callable:
    if cfg.recipe == "original":
        weight = torch.ones(n_classes, device=dev)
        weight[own] = 5.0
        return lambda out, y, x: F.cross_entropy(out, y, weight=weight)

    def loss(out, y, x, out_ref=None, x_ref=None):
        ce = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
        if cfg.scope == "shard":
            return ce
        with torch.no_grad():
            t = base(x).float()
            t_ref = base(x_ref).float() if x_ref is not None else None
        kd = kd_loss(out, t, cfg.kd_temperature)
        if out_ref is not None:
            kd = (kd * len(out) + kd_loss(out_ref, t_ref, cfg.kd_temperature) * len(out_ref)) / (
                len(out) + len(out_ref))
        return cfg.ce_weight * ce + kd
    return loss


def finetune(model: nn.Module, base: nn.Module, shard: Split, val: Split, cfg: PruneConfig,
             ref: Split | None = None, pool: Split | None = None,
             on_epoch: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Fine-tune ``model`` (global 10-way labels) and return the best-validation weights."""
    dev = shard.y.device
    own = list(cfg.classes)
    base = base.eval()
    primary = pool if cfg.scope == "all" else shard
    sel_val = val.shard(own) if cfg.scope == "shard" else val
    gen = torch.Generator().manual_seed(cfg.seed)
    n_epoch = int(len(shard) / 0.9) if cfg.recipe == "original" else len(primary)
    steps = max(1, cfg.epochs * num_batches(n_epoch, cfg.batch_size))
    opt, sched = make_optimizer(model, cfg, steps, dev)
    loss_fn = _loss_fn(cfg, base, own, base.linear.out_features, dev)
    ref_iter = _cycle(ref, cfg.batch_size, gen) if cfg.scope == "shard+public" and ref is not None else None
    model = model.to(memory_format=torch.channels_last)

    def val_acc() -> float:  # selection only, so the training precision is precise enough
        with autocast(dev, cfg.precision):
            return accuracy(model, sel_val).overall

    best = {"val": val_acc(), "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    history = [{"epoch": 0, "val_acc": best["val"]}]
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = _original_order(primary, own, len(shard), gen) if cfg.recipe == "original" else None
        tot, seen = 0.0, 0
        for x, y in batches(primary, cfg.batch_size, train=True, gen=gen, channels_last=True,
                            order=order):
            with autocast(dev, cfg.precision):
                if ref_iter is not None:
                    x_ref, _ = next(ref_iter)
                    out_all = model(torch.cat([x, x_ref])).float()
                    loss = loss_fn(out_all[:len(x)], y, x, out_all[len(x):], x_ref)
                else:
                    loss = loss_fn(model(x).float(), y, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot, seen = tot + loss.detach() * len(y), seen + len(y)
        acc = val_acc()
        history.append({"epoch": epoch, "loss": float(tot / max(seen, 1)), "val_acc": acc})
        if on_epoch:
            on_epoch(history[-1])
        if acc >= best["val"]:
            best = {"val": acc, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best["state"])
    return FinetuneResult(model.eval(), best["val"], best["epoch"], history)
