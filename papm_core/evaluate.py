"""Accuracy (overall and per class), batch-1 latency and throughput of a model.

Latency is the median of at least 200 timed batch-1 forward passes after a warm-up,
in ms, with the device and torch thread count recorded beside it.

Example: ``papm eval checkpoints/base.pt --data ../shared/data/cifar10-jpeg75.tar.xz``
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from .data import Split
from .loader import batches


@dataclass
class Accuracy:
    overall: float              # %, over every image of the split
    per_class: dict[str, float]  # class name -> % correct
    n: int


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int = 1000,
            channels_last: bool = False) -> torch.Tensor:
    """Predicted labels for every image of ``split`` (model in eval mode)."""
    model.eval()
    dev = next(model.parameters()).device
    autocast = dev.type == "cuda"
    preds = []
    for x, _ in batches(split.to(dev) if split.x.device != dev else split, batch_size,
                        train=False, channels_last=channels_last):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            preds.append(model(x).argmax(1))
    return torch.cat(preds).cpu()


def accuracy(model: nn.Module, split: Split, batch_size: int = 1000,
             channels_last: bool = False) -> Accuracy:
    pred = predict(model, split, batch_size, channels_last)
    y = split.y.cpu()
    per = {}
    for local, name in enumerate(split.classes):
        mask = y == local
        if mask.any():
            per[name] = 100.0 * (pred[mask] == local).float().mean().item()
    overall = 100.0 * (pred == y).float().mean().item() if len(y) else 0.0
    return Accuracy(overall, per, len(y))


@torch.no_grad()
def latency_ms(model: nn.Module, runs: int = 200, warmup: int = 20,
               device: torch.device | str = "cpu") -> dict:
    """Median batch-1 forward time in ms over ``runs`` timed runs (at least 200)."""
    runs = max(runs, 200)
    model = model.to(device).eval()
    x = torch.randn(1, 3, 32, 32, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "p90_ms": sorted(times)[int(0.9 * runs)],
            "runs": runs, "device": str(device), "threads": torch.get_num_threads()}


@torch.no_grad()
def throughput(model: nn.Module, batch_size: int = 256, iters: int = 5,
               device: torch.device | str = "cpu") -> dict:
    """Inference images/s at a large batch (after one warm-up batch)."""
    model = model.to(device).eval()
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    model(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        model(x)
    sync()
    dt = time.perf_counter() - t0
    return {"images_per_s": batch_size * iters / dt, "batch_size": batch_size}
