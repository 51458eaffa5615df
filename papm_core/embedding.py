"""What a device uploads to the fusion head, and the cache of it: ``device_embedding``
(per image, its pooled features and its own classifier's log-probabilities over all
classes), ``embed`` over a split, and ``cached_embed`` on disk by (checkpoint, images).
The head that consumes them is ``papm_core.fusion``.

Example: ``papm fuse --groups result/groups.json --devices 2`` embeds the public set with
every device (``cached_embed``) before it trains the head.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Split, cache_dir
from .evaluate import eval_batch_size
from .loader import batches
from .util import atomic_write, file_sha256


def device_embedding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a device uploads per normalised image: its pooled features and its own
    classifier's log-probabilities over all classes, float32 [n, num_features + K]."""
    f = model.forward_head(model.forward_features(x), pre_logits=True).float()
    return torch.cat([f, F.log_softmax(model.get_classifier()(f).float(), 1)], 1)


def embedding_dim(model: nn.Module) -> int:
    """Width of ``device_embedding``: num_features + the classifier's class count."""
    return int(model.num_features) + int(model.num_classes)


@torch.no_grad()
def embed(model: nn.Module, images: Split, batch_size: int | None = None) -> np.ndarray:
    """Frozen embeddings (float32 [n, d + K], ``device_embedding``) of ``images``."""
    model.eval()
    dev = next(model.parameters()).device
    batch_size = batch_size or eval_batch_size(dev)
    out = [device_embedding(model, x).cpu()
           for x, _ in batches(images.to(dev), batch_size, train=False, channels_last=True)]
    return torch.cat(out).numpy() if out else np.zeros((0, embedding_dim(model)), np.float32)


def images_key(split: Split) -> str:
    """Content hash of a split's images and labels (what an embedding depends on)."""
    h = hashlib.sha256(split.x.cpu().numpy().tobytes())
    h.update(split.y.cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def cached_embed(ckpt_path: str | Path, model: nn.Module, images: Split,
                 root: Path | None = None) -> np.ndarray:
    """``embed`` cached on disk by (device checkpoint sha256, images hash)."""
    # "e2": features + log-probabilities (entries of the features-only format are not read)
    key = f"{file_sha256(ckpt_path)[:32]}-{images_key(images)}-e2"
    path = (root or cache_dir() / "embeddings") / f"{key}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # damaged cache entry: recompute
    emb = embed(model, images)
    atomic_write(path, lambda p: np.save(open(p, "wb"), emb))
    return emb
