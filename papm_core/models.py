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
from typing import Any, NamedTuple

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


class Conv(NamedTuple):
    """One conv of the spec's channel plan: its module and BN names, the unit whose channels
    it writes (``out``) and reads (``inp``; ``"input"`` = the image), its kernel size, and
    where its channels' ReLU activations are seen (``"bn"``: ReLU of its BN, ``"out"``: the
    block's post-addition ReLU, None: not at all)."""

    conv: str
    bn: str
    out: str
    inp: str
    kernel: int
    act: str | None


def _projects(c_in: int, out: int, stride: int) -> bool:
    return stride != 1 or c_in != out


def channel_plan(spec: dict[str, Any]) -> list[Conv]:
    """Every conv of the ResNet18 a spec builds, in forward order: the one place the model's
    channel coupling is written down (pruning units, slimming and parameter counts read it).

    Units: ``layer{s}.{b}.inner`` (a block's first conv), ``stage{s}`` (the residual width:
    both blocks' second conv and the stage's 1x1 shortcut, added together), and ``stem``,
    which is ``stage1`` itself when stage 1 has identity shortcuts (they add the stem's
    channels to its blocks' outputs)."""
    stages = spec["stages"]
    prev = "stage1" if not _projects(int(spec["stem"]), int(stages[0]["out"]), STRIDES[0]) else "stem"
    plan = [Conv("conv1", "bn1", prev, "input", 3, "bn")]
    widths = unit_widths(spec)
    for s, (st, stride) in enumerate(zip(stages, STRIDES), start=1):
        for b in range(len(st["inner"])):
            blk = f"layer{s}.{b}"
            plan += [Conv(f"{blk}.conv1", f"{blk}.bn1", f"{blk}.inner", prev, 3, "bn"),
                     Conv(f"{blk}.conv2", f"{blk}.bn2", f"stage{s}", f"{blk}.inner", 3, "out")]
            if _projects(widths[prev], int(st["out"]), stride if b == 0 else 1):
                plan.append(Conv(f"{blk}.shortcut.0", f"{blk}.shortcut.1", f"stage{s}", prev, 1, None))
            prev = f"stage{s}"
    return plan


def unit_widths(spec: dict[str, Any]) -> dict[str, int]:
    """Each pruning unit's channel count in ``spec`` (units: ``channel_plan``)."""
    stages = spec["stages"]
    shared = not _projects(int(spec["stem"]), int(stages[0]["out"]), STRIDES[0])
    out = {} if shared else {"stem": int(spec["stem"])}
    for s, st in enumerate(stages, start=1):
        out.update({f"layer{s}.{b}.inner": int(w) for b, w in enumerate(st["inner"])})
        out[f"stage{s}"] = int(st["out"])
    return out


def with_widths(spec: dict[str, Any], widths: dict[str, int]) -> dict[str, Any]:
    """``spec`` with each unit's width replaced by ``widths[unit]`` (the inverse of ``unit_widths``)."""
    new = copy.deepcopy(spec)
    new["stem"] = int(widths.get("stem", widths["stage1"]))
    for s, st in enumerate(new["stages"], start=1):
        st["out"] = int(widths[f"stage{s}"])
        st["inner"] = [int(widths[f"layer{s}.{b}.inner"]) for b in range(len(st["inner"]))]
    return new


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def spec_params(spec: dict[str, Any]) -> int:
    """Parameter count of the model a spec builds, without building it (pruning search):
    each conv's weights and BN affine pair, then the classifier."""
    w = {**unit_widths(spec), "input": 3}
    total = sum(c.kernel ** 2 * w[c.inp] * w[c.out] + 2 * w[c.out] for c in channel_plan(spec))
    k = int(spec["num_classes"])
    return total + w[f"stage{len(spec['stages'])}"] * k + k
