"""Train the base classifier centrally: ``train(cfg) -> TrainResult``.

Recipe: SGD with Nesterov momentum, a one-cycle (linear up, linear down) LR per step,
label smoothing and weight decay (not on BN/bias). channels_last; bf16 autocast on CUDA
and on CPUs with native bf16 (AMX, AVX512-BF16), fp32 elsewhere (``--precision``); losses in fp32. Selection is on
the validation split carved from train; the test split is evaluated once, at the end,
for reporting only.

Example: ``papm train --width 0.25 --epochs 10 --batch-size 256 --lr 0.2 --data ../shared/data/cifar10-jpeg75.tar.xz``
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import checkpoint
from .config import TrainConfig, to_dict
from .data import Split, base_val_size, carve, load_dataset
from .evaluate import accuracy
from .loader import batches, num_batches
from .models import build_model, count_params, resnet18_spec
from .util import autocast, resolve_device, resolve_precision, seed_everything, write_json


@dataclass
class TrainResult:
    model: nn.Module
    path: Path
    best_val: float
    best_epoch: int
    test_acc: float
    history: list[dict]
    seconds: float


def make_optimizer(model: nn.Module, cfg: TrainConfig, steps: int, device: torch.device):
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fast = {"foreach": True} if device.type == "cuda" else {}
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, **fast)
    up = max(1, int(cfg.warmup * steps))

    def factor(step: int) -> float:  # one-cycle: 0.1 -> 1 over `up` steps, then -> 0
        if step < up:
            return 0.1 + 0.9 * step / up
        return max(0.0, (steps - step) / max(1, steps - up))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_epoch(model, opt, sched, split: Split, cfg: TrainConfig, gen, prog, task,
                channels_last: bool) -> dict:
    model.train()
    dev = split.y.device
    tot_loss, tot_ok, seen, t0 = torch.zeros((), device=dev), torch.zeros((), device=dev), 0, time.perf_counter()
    for x, y in batches(split, cfg.batch_size, train=True, gen=gen, channels_last=channels_last,
                        drop_last=True):
        with autocast(dev, cfg.precision):
            out = model(x).float()
            loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        # accumulate on device: no per-batch host sync
        tot_loss += loss.detach() * len(y)
        tot_ok += (out.argmax(1) == y).sum()
        seen += len(y)
        if prog is not None and (dev.type != "cuda" or seen % (cfg.batch_size * 20) == 0):
            prog.update(task, advance=len(y), loss=(tot_loss / seen).item(),
                        acc=100 * (tot_ok / seen).item(), ips=seen / (time.perf_counter() - t0))
    secs = time.perf_counter() - t0
    return {"loss": (tot_loss / seen).item(), "train_acc": 100 * (tot_ok / seen).item(),
            "images_per_s": seen / secs, "seconds": secs}


def prepare_data(cfg: TrainConfig, device: torch.device):
    ds = load_dataset(cfg.data)
    train, test = ds.train, ds.test
    if cfg.classes:
        train, test = train.shard(cfg.classes, remap=True), test.shard(cfg.classes, remap=True)
    # the size is a cap (data.SPLIT_SHARE of the training images); the checkpoint records the
    # size used, so later stages carve exactly this validation split
    cfg.val_size = base_val_size(train, cfg.val_size, cfg.per_class)
    train, val = carve(train, cfg.val_size, cfg.seed, cfg.per_class)
    return ds, train.to(device), val.to(device), test


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn(
        "loss {task.fields[loss]:.3f} acc {task.fields[acc]:5.1f}% {task.fields[ips]:6.0f} img/s"),
        TimeElapsedColumn(), TimeRemainingColumn())


def train(cfg: TrainConfig, show_progress: bool = True, log=print) -> TrainResult:
    """Train a ResNet18 base model per ``cfg``; keeps the best-validation checkpoint."""
    cfg.validate()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    ds, train_s, val_s, test_s = prepare_data(cfg, device)
    channels_last = True  # faster on CPU too: benchmarks/throughput.py --layouts
    model = build_model(resnet18_spec(cfg.width, len(train_s.classes))).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps = cfg.epochs * num_batches(len(train_s), cfg.batch_size, drop_last=True)
    opt, sched = make_optimizer(model, cfg, steps, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out)
    meta = dict(class_names=train_s.classes, classes=train_s.class_ids, config=to_dict(cfg),
                extra={"precision": dict(zip(("resolved", "why"), resolve_precision(device, cfg.precision)))})
    history, best_val, best_epoch, best_state, t_start = [], -1.0, 0, None, time.perf_counter()
    prog = progress() if show_progress else None
    say = prog.console.print if prog else log
    with (prog or _Null()):
        for epoch in range(1, cfg.epochs + 1):
            task = prog.add_task(f"epoch {epoch}/{cfg.epochs}", total=len(train_s), loss=0.0,
                                 acc=0.0, ips=0.0) if prog else None
            stats = train_epoch(model, opt, sched, train_s, cfg, gen, prog, task, channels_last)
            with autocast(device, cfg.precision):  # selection only; the test figure below is fp32
                stats["val_acc"] = accuracy(model, val_s, channels_last=channels_last).overall
            stats["epoch"] = epoch
            history.append(stats)
            if prog:
                prog.update(task, description=f"epoch {epoch}/{cfg.epochs} val {stats['val_acc']:.2f}%")
            if stats["val_acc"] > best_val:
                best_val, best_epoch = stats["val_acc"], epoch
                best_state = copy.deepcopy(model.state_dict())
                # on disk too, so an interrupted run still leaves its best model
                checkpoint.save(out, model, kind="base", metrics={
                    "val_acc": best_val, "best_epoch": epoch, "complete": False}, **meta)
            say(f"epoch {epoch:3d}  loss {stats['loss']:.3f}  train {stats['train_acc']:5.1f}%  "
                f"val {stats['val_acc']:5.2f}%  {stats['images_per_s']:6.0f} img/s  "
                f"{stats['seconds']:5.1f}s")
    model.load_state_dict(best_state)
    test = accuracy(model, test_s.to(device), channels_last=channels_last)
    secs = time.perf_counter() - t_start
    metrics = {"complete": True, "val_acc": best_val, "best_epoch": best_epoch, "test_acc": test.overall,
               "test_per_class": test.per_class, "params": count_params(model),
               "train_seconds": secs, "data_key": ds.key, "history": history}
    checkpoint.save(out, model, kind="base", metrics=metrics, **meta)
    side = {k: v for k, v in meta.items() if k != "extra"}  # as the checkpoint reads: extra keys on top
    write_json(out.with_suffix(".json"), {"metrics": metrics, **side, **meta["extra"]})
    return TrainResult(model, out, best_val, best_epoch, test.overall, history, secs)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
