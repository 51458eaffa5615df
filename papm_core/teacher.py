"""Precomputed distillation targets: the base model's logits for both flip views of every
image, so fine-tuning with flip-only augmentation never runs the teacher in its loop.

With ``augment = "flip"`` an image is seen either as it is or mirrored, so the teacher's
answer to every view a student can see is known in advance: a table ``[n, 2, K]`` (view
0 = as is, 1 = mirrored). The targets are exact, not an approximation of the live
teacher. On a CPU the teacher's forward pass is about half of a distillation step
(width-0.25 ResNet18, 256 images, one thread: 0.33-0.40 s of 0.72-0.79 s, AVX2 fp32).

Tables are cached per class (base weights x that class's images) under a folder, so
every device model that serves a class, at any N, reuses the class's table, and the
public reference set's table is computed once per node.

Example: ``python -c "from papm_core.teacher import flip_logits; help(flip_logits)"``
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .data import Split
from .embedding import images_key
from .loader import READS, normalize
from .util import atomic_write, autocast, use_bf16


def model_key(model: nn.Module) -> str:
    """Content hash of a model's weights and buffers (what its logits depend on)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()[:32]


@torch.no_grad()
def flip_logits(model: nn.Module, split: Split, precision: str = "auto",
                batch_size: int = 500) -> torch.Tensor:
    """float32 ``[n, 2, K]``: logits of each image as it is (0) and mirrored (1), computed
    in eval mode under the fine-tuning loop's autocast, as the live teacher would be."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    READS[split.name] += len(split)
    for i in range(0, len(split), batch_size):
        x = split.x[i:i + batch_size].to(dev)
        with autocast(dev, precision):
            views = [model(normalize(v, channels_last=True)).float() for v in (x, x.flip(3))]
        out.append(torch.stack(views, 1))
    k = model.num_classes
    return torch.cat(out).to(dev) if out else torch.zeros(0, 2, k, device=dev)


def _save(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.save would append .npy to a name
        np.save(fh, arr)


def _load(path: Path, n: int) -> torch.Tensor | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None  # missing or damaged entry: recompute
    return torch.from_numpy(arr) if arr.ndim == 3 and arr.shape[:2] == (n, 2) else None


def cached_flip_logits(model: nn.Module, split: Split, root: Path | None, precision: str = "auto",
                       key: str | None = None) -> torch.Tensor:
    """``flip_logits`` assembled from per-class tables cached under ``root`` (no cache when
    ``root`` is None). ``key`` is ``model_key(model)``, passed in to hash the weights once."""
    if root is None:
        return flip_logits(model, split, precision)
    dev = split.y.device
    key = key or model_key(model)
    resolved = "bf16" if use_bf16(next(model.parameters()).device, precision) else "fp32"  # what ran
    out = None
    for c in split.y.unique().tolist():
        idx = (split.y == c).nonzero().flatten()
        part = split.take(idx, name=split.name)
        path = Path(root) / f"{key}-{resolved}-{images_key(part)}.npy"
        table = _load(path, len(part))
        if table is None:
            table = flip_logits(model, part, precision).cpu()
            atomic_write(path, lambda p, a=table.numpy(): _save(p, a))
        if out is None:
            out = torch.zeros(len(split), 2, table.shape[2])
        out[idx.cpu()] = table
    return (out if out is not None else flip_logits(model, split, precision)).to(dev)
