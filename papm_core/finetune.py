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

Selection uses the device's **own held-out images** (``node_val``: a slice of its shard
that it never trains on; never images the server sends), after the epochs of the
schedule's second half (``validated``) and before training. The criterion is the
training objective itself on those images (distillation from the base model, plus
cross-entropy by ``ce_weight``; lower is better): own-class accuracy cannot select a
one-class device, since predicting that class always scores 100 %, while the
distillation loss still measures how well the device answers for every class. Ties go
to the later epoch. The own-class accuracy on the same images is recorded beside it.

Augmentation (``augment``): ``crop+flip`` (4-px padded random crop and mirror) runs the
teacher on every batch; ``flip`` (mirror only) looks the teacher's logits up in tables
computed once per class (``teacher``), which removes the teacher's forward pass, about
half of a CPU distillation step, from the loop.

Example: ``papm prune --base checkpoints/base.pt --classes 3 5 --scope shard+public``
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PruneConfig
from .data import Split
from .evaluate import eval_batch_size
from .loader import batches, flip_batches, num_batches
from .teacher import cached_flip_logits, model_key
from .train import make_optimizer
from .util import autocast, use_bf16


@dataclass
class FinetuneResult:
    model: nn.Module
    best_val_loss: float   # the selection criterion on the device's held-out images
    best_val_acc: float    # own-class accuracy on the same images at that epoch (recorded only)
    best_epoch: int
    history: list[dict]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1),
                    reduction="batchmean") * t * t


def validated(epoch: int, epochs: int) -> bool:
    """Whether selection evaluates after ``epoch``: only in the second half of the schedule,
    where the decaying learning rate puts the best weights; it saves half the validation
    passes (docs/results.md records where the quick preset's device models peaked)."""
    return 2 * epoch >= epochs


@torch.no_grad()
def held_out(model: nn.Module, val: Split, teacher: torch.Tensor | None, loss_fn, cfg) -> tuple[float, float]:
    """(mean training objective, own-class accuracy %) of ``model`` on held-out images;
    ``teacher``: the base model's logits for ``val`` (None where nothing is distilled)."""
    model.eval()
    dev = val.y.device
    tot, right, start = 0.0, 0, 0
    for x, y in batches(val, eval_batch_size(dev), train=False, channels_last=True):
        with autocast(dev, cfg.precision):
            out = model(x).float()
        t = teacher[start:start + len(y)] if teacher is not None else None
        tot += float(loss_fn(out, y, t)) * len(y)
        right += int((out.argmax(1) == y).sum())
        start += len(y)
    n = max(start, 1)
    return tot / n, 100.0 * right / n


@torch.no_grad()
def teacher_logits(base: nn.Module, split: Split, precision: str) -> torch.Tensor:
    """The base model's logits for ``split`` in order (eval mode, the loop's autocast)."""
    dev = split.y.device
    out = []
    for x, _ in batches(split, eval_batch_size(dev), train=False, channels_last=True):
        with autocast(dev, precision):
            out.append(base(x).float())
    return torch.cat(out) if out else torch.zeros(0, base.linear.out_features, device=dev)


OWN_SHARE = 0.9  # the original recipe: own-class share of each epoch's draws (9:1)


def _cycle(split: Split, cfg: PruneConfig, gen: torch.Generator) -> Iterator[tuple]:
    while True:
        yield from _train_batches(split, cfg, gen)


def _original_order(pool: Split, own: list[int], n_draws: int, gen: torch.Generator) -> torch.Tensor:
    """Indices for one epoch (``n_draws``, ``epoch_images``) of 9:1 own-vs-other weighted
    sampling with replacement."""
    is_own = torch.isin(pool.y.cpu(), torch.tensor(own))
    w = torch.where(is_own, OWN_SHARE / max(1, int(is_own.sum())), 0.1 / max(1, int((~is_own).sum())))
    return torch.multinomial(w, max(1, n_draws), replacement=True, generator=gen)


def _loss_fn(cfg: PruneConfig, own: list[int], n_classes: int, dev) -> Callable:
    """loss(out, y, t, out_ref, t_ref): ``t``/``t_ref`` are the teacher's logits for the
    shard and reference batches (None where the recipe does not distil)."""
    if cfg.recipe == "original":
        weight = torch.ones(n_classes, device=dev)
        weight[own] = 5.0
        return lambda out, y, t=None, out_ref=None, t_ref=None: F.cross_entropy(out, y, weight=weight)

    def loss(out, y, t=None, out_ref=None, t_ref=None):
        ce = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
        if cfg.scope == "shard":
            return ce
        kd = kd_loss(out, t, cfg.kd_temperature)
        if out_ref is not None:
            kd = (kd * len(out) + kd_loss(out_ref, t_ref, cfg.kd_temperature) * len(out_ref)) / (
                len(out) + len(out_ref))
        return cfg.ce_weight * ce + kd
    return loss


def distils(cfg: PruneConfig) -> bool:
    return cfg.recipe == "papm" and cfg.scope != "shard"


def epoch_images(cfg: PruneConfig, n_shard: int, n_pool: int) -> int:
    """Images one fine-tuning epoch draws, from the device's own-class images (``n_shard``)
    and, for ``scope = "all"``, all its private images (``n_pool``). The original recipe
    samples own:other 9:1, so its epoch draws n_shard / 0.9 and own images are seen about once."""
    if cfg.recipe == "original":
        return int(n_shard / OWN_SHARE)
    return n_pool if cfg.scope == "all" else n_shard


def finetune_epochs(cfg: PruneConfig, n_epoch: int) -> int:
    """Epochs to run: ``cfg.epochs``, raised until ``cfg.min_steps`` optimizer steps are
    reached. A one-class shard (4,000 images, 32 batches of 128) gets 96 steps in 3
    epochs, a six-class one 564, so without a floor the smallest devices train least."""
    per_epoch = max(1, num_batches(n_epoch, cfg.batch_size))
    return max(cfg.epochs, -(-cfg.min_steps // per_epoch)) if cfg.epochs else 0


def _train_batches(split: Split, cfg: PruneConfig, gen: torch.Generator, order=None):
    """(images, labels, indices, flipped) per batch; indices and flips are None under
    crop+flip augmentation, whose views no table can hold."""
    dev = split.y.device
    # fp32 on CPU: an odd batch (> 1 image) loses its last image. oneDNN's AVX-512 kernel
    # for the backward weights of a 1x1 stride-2 convolution (the residual shortcuts),
    # channels_last, 2 threads, corrupts memory on odd batches (torch 2.14.1; seen on an
    # Intel Xeon); bf16 autocast takes other kernels and keeps every image.
    even = dev.type == "cpu" and not use_bf16(dev, cfg.precision)
    if cfg.augment == "flip":
        source = flip_batches(split, cfg.batch_size, gen, channels_last=True, order=order)
    else:
        source = ((x, y, None, None) for x, y in batches(split, cfg.batch_size, train=True, gen=gen,
                                                           channels_last=True, order=order))
    for b in source:
        if even and len(b[1]) > 1 and len(b[1]) % 2:
            b = tuple(t[:-1] if t is not None else None for t in b)
        yield b


class _Teacher:
    """The base model's logits for a training batch: looked up in a flip-view table
    (``teacher.flip_logits``) when there is one, else computed live."""

    def __init__(self, base: nn.Module, table: torch.Tensor | None):
        self.base, self.table = base, table

    @torch.no_grad()
    def __call__(self, x, idx, flip) -> torch.Tensor:
        if self.table is not None:
            return self.table[idx, flip.long()]
        return self.base(x).float()


def _teachers(base, primary: Split, ref: Split | None, cfg: PruneConfig, cache: Path | None):
    """Teachers for the primary and reference batches (None where nothing is distilled)."""
    if not distils(cfg):
        return None, None
    if cfg.augment != "flip":
        return _Teacher(base, None), _Teacher(base, None)
    key = model_key(base)
    tables = [cached_flip_logits(base, s, cache, cfg.precision, key) if s is not None else None
              for s in (primary, ref)]
    return _Teacher(base, tables[0]), _Teacher(base, tables[1])


def finetune(model: nn.Module, base: nn.Module, shard: Split, val: Split, cfg: PruneConfig,
             ref: Split | None = None, pool: Split | None = None,
             on_epoch: Callable[[dict], None] | None = None,
             teacher_cache: Path | None = None) -> FinetuneResult:
    """Fine-tune ``model`` (global labels) and return the weights with the lowest objective on
    ``val``, the device's own held-out images. ``teacher_cache``: folder of per-class teacher
    tables (``augment = "flip"`` only)."""
    dev = shard.y.device
    own = list(cfg.classes)
    base = base.eval()
    primary = pool if cfg.scope == "all" else shard
    gen = torch.Generator().manual_seed(cfg.seed)
    n_epoch = epoch_images(cfg, len(shard), len(primary))
    epochs = finetune_epochs(cfg, n_epoch)
    steps = max(1, epochs * num_batches(n_epoch, cfg.batch_size))
    opt, sched = make_optimizer(model, cfg, steps, dev)
    loss_fn = _loss_fn(cfg, own, base.linear.out_features, dev)
    use_ref = cfg.scope == "shard+public" and ref is not None and distils(cfg)
    teach, teach_ref = _teachers(base, primary, ref if use_ref else None, cfg, teacher_cache)
    ref_iter = _cycle(ref, cfg, gen) if use_ref else None
    model = model.to(memory_format=torch.channels_last)

    t_val = teacher_logits(base, val, cfg.precision) if distils(cfg) else None
    loss0, acc0 = held_out(model, val, t_val, loss_fn, cfg)
    best = {"loss": loss0, "acc": acc0, "epoch": 0, "state": copy.deepcopy(model.state_dict())}
    history = [{"epoch": 0, "val_loss": loss0, "val_acc": acc0}]
    for epoch in range(1, epochs + 1):
        model.train()
        order = _original_order(primary, own, n_epoch, gen) if cfg.recipe == "original" else None
        tot, seen = 0.0, 0
        for x, y, idx, flip in _train_batches(primary, cfg, gen, order):
            with autocast(dev, cfg.precision):
                t = teach(x, idx, flip) if teach else None
                if ref_iter is not None:
                    x_ref, _, idx_r, flip_r = next(ref_iter)
                    out_all = model(torch.cat([x, x_ref])).float()
                    loss = loss_fn(out_all[:len(x)], y, t, out_all[len(x):], teach_ref(x_ref, idx_r, flip_r))
                else:
                    loss = loss_fn(model(x).float(), y, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot, seen = tot + loss.detach() * len(y), seen + len(y)
        vl, acc = held_out(model, val, t_val, loss_fn, cfg) if validated(epoch, epochs) else (None, None)
        history.append({"epoch": epoch, "epochs": epochs, "loss": float(tot / max(seen, 1)),
                        "val_loss": vl, "val_acc": acc})
        if on_epoch:
            on_epoch(history[-1])
        if vl is not None and vl <= best["loss"]:
            best = {"loss": vl, "acc": acc, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best["state"])
    return FinetuneResult(model.eval(), best["loss"], best["acc"], best["epoch"], history)
