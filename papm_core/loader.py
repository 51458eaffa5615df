"""On-device batches: uint8 images live on the compute device and are augmented there.

As in airbench, a whole batch is cropped (4-pixel zero padding, random 32x32 window)
and flipped with one gather on the device, then normalised to float. There is no
per-sample host work and no DataLoader worker.

Example::

    python -c "import torch; from papm_core.loader import augment
    print(augment(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.Generator()).shape)"
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator

import torch
import torch.nn.functional as F

from .data import Split

# Per-channel CIFAR-10 statistics (of 0..1 pixels); used for every source so a model
# trained on one copy evaluates the same way on another.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PAD = 4  # pixels of zero padding for the random crop
# Images served per split name in this process: lets tests prove that training and
# selection never read the test split.
READS: Counter = Counter()


def normalize(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW -> float32 normalised NCHW (optionally channels_last memory)."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1) * 255
    out = (x.float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4-px zero padding plus horizontal flip, for a uint8 batch."""
    n, _, h, w = x.shape
    dev = x.device
    # Random draws come from a CPU generator so runs are identical on any device.
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=gen).to(dev)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=gen).to(dev)
    flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])  # [n, h]
    cols = torch.arange(w, device=dev)[None, :] + dx[:, None]  # [n, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=dev)[:, None, None, None]
    idx_c = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


def batches(split: Split, batch_size: int, *, train: bool, gen: torch.Generator | None = None,
            channels_last: bool = False, drop_last: bool = False,
            order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (normalised float images, labels) batches from a split already on its device.

    ``train=True`` shuffles and augments using ``gen`` (a seeded CPU generator);
    ``order`` replaces the shuffle with given indices (weighted sampling).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(split) if order is None else len(order)
    if train and gen is None:
        raise ValueError("a seeded generator is needed for training batches")
    if order is not None:
        order = order.to(split.y.device)
    elif train:
        order = torch.randperm(n, generator=gen).to(split.y.device)
    else:
        order = torch.arange(n, device=split.y.device)
    stop = n - n % batch_size if (drop_last and n >= batch_size) else n
    READS[split.name] += stop
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        x = split.x[idx]
        if train:
            x = augment(x, gen)
        yield normalize(x, channels_last), split.y[idx]


def flip_batches(split: Split, batch_size: int, gen: torch.Generator, channels_last: bool = False,
                 order: torch.Tensor | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Shuffled batches with flip-only augmentation: (normalised images, labels, indices,
    flipped). The indices and flip flags pick precomputed teacher targets (``teacher``);
    ``order`` replaces the shuffle with given indices (weighted sampling)."""
    dev = split.y.device
    order = (torch.randperm(len(split), generator=gen) if order is None else order).to(dev)
    READS[split.name] += len(order)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        flip = (torch.rand(len(idx), generator=gen) < 0.5).to(dev)
        x = split.x[idx]
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        yield normalize(x, channels_last), split.y[idx], idx, flip


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    if drop_last and n >= batch_size:
        return n // batch_size
    return -(-n // batch_size)
