"""CIFAR ResNet18 built from an explicit per-layer width spec.

The spec is a plain JSON-serialisable dict, so a pruned model is the same class with
other widths and loads without any pruning code::

    {"arch": "resnet18", "num_classes": 10, "stem": 64,
     "stages": [{"out": 64, "inner": [64, 64]}, {"out": 128, "inner": [128, 128]},
                {"out": 256, "inner": [256, 256]}, {"out": 512, "inner": [512, 512]}]}

``stem`` is the 3x3 stem conv's output; each stage's ``out`` is its residual width
(both blocks' second conv and the stage's 1x1 shortcut conv); ``inner`` is each
block's first conv. 3x3 stem, no max-pool, BasicBlocks [2,2,2,2], strides [1,2,2,2].

Example: ``python -c "from papm_core.models import *; print(count_params(build_model(resnet18_spec())))"``
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .util import PapmError

BASE_WIDTHS = (64, 128, 256, 512)
STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = 2


def resnet18_spec(width: float = 1.0, num_classes: int = 10) -> dict[str, Any]:
    """The uniform spec at a width multiplier (1.0 = the standard 11,173,962 parameters)."""
    if not width > 0:
        raise PapmError(f"--width must be positive, got {width}")
    ws = [max(1, int(round(c * width))) for c in BASE_WIDTHS]
    return {"arch": "resnet18", "num_classes": int(num_classes), "stem": ws[0],
            "stages": [{"out": w, "inner": [w] * BLOCKS_PER_STAGE} for w in ws]}


def validate_spec(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        ok = (spec["arch"] == "resnet18" and int(spec["num_classes"]) > 0 and int(spec["stem"]) > 0
              and len(spec["stages"]) == len(BASE_WIDTHS)
              and all(int(s["out"]) > 0 and len(s["inner"]) == BLOCKS_PER_STAGE
                      and all(int(i) > 0 for i in s["inner"]) for s in spec["stages"]))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise PapmError(f"invalid resnet18 width spec: {spec}")
    return copy.deepcopy(spec)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, inner: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18 for 32x32 inputs; ``forward = forward_head(forward_features(x))``."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = validate_spec(spec)
        stem = int(spec["stem"])
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        c_in, stages = stem, []
        for st, stride in zip(spec["stages"], STRIDES):
            blocks = []
            for b, inner in enumerate(st["inner"]):
                blocks.append(BasicBlock(c_in, int(inner), int(st["out"]), stride if b == 0 else 1))
                c_in = int(st["out"])
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = c_in
        self.num_classes = int(spec["num_classes"])
        self.linear = nn.Linear(c_in, self.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled feature map, as timm's models return it.

        Args: x: normalised images [N, 3, H, W].
        Returns: [N, num_features, H/8, W/8].
        """
        out = F.relu(self.bn1(self.conv1(x)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = layer(out)
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, then the classifier.

        Args: x: a feature map from ``forward_features``; pre_logits: stop after pooling.
        Returns: [N, num_features] pooled features (the device embedding's seam) if
        ``pre_logits``, else logits [N, num_classes].
        """
        f = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return f if pre_logits else self.linear(f)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate the architecture a spec names (the checkpoint loader calls this)."""
    arch = spec.get("arch") if isinstance(spec, dict) else None
    if arch == "resnet18":
        return ResNet18(spec)
    if arch == "fusion-mlp":
        from .fusion import FusionHead  # late import: fusion depends on the data layer
        return FusionHead(spec)
    raise PapmError(f"unknown architecture {arch!r} in model spec")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def spec_params(spec: dict[str, Any]) -> int:
    """Parameter count of the model a spec builds, without building it (pruning search)."""
    c_in = int(spec["stem"])
    total = 3 * 9 * c_in + 2 * c_in  # stem conv + BN affine
    for st, stride in zip(spec["stages"], STRIDES):
        out = int(st["out"])
        for b, inner in enumerate(st["inner"]):
            inner = int(inner)
            total += 9 * c_in * inner + 2 * inner + 9 * inner * out + 2 * out
            if (stride if b == 0 else 1) != 1 or c_in != out:
                total += c_in * out + 2 * out
            c_in = out
    k = int(spec["num_classes"])
    return total + c_in * k + k
