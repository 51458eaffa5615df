"""One checkpoint format for every model the project produces (base, pruned, fusion).

A checkpoint is a ``torch.save`` of plain data only::

    {"format": "papm-checkpoint", "version": 1,
     "meta": "<JSON text>",          # spec (architecture + every width), kind, class
                                      # names, classes served, metrics, config, provenance
     "state_dict": {name: tensor}}

It loads with ``torch.load(weights_only=True)``, so no arbitrary object is ever
unpickled, and the architecture is rebuilt from ``meta["spec"]`` alone: a pruned model
loads without the pruning code. Writes are atomic (temporary file, then rename).
Sizes are reported in MB = 2**20 bytes, as the original project's tables do.

Example::

    python -c "from papm_core.checkpoint import load; m, meta = load('checkpoints/base.pt'); print(meta['spec'])"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .models import build_model
from .util import PapmError, atomic_write, provenance

FORMAT = "papm-checkpoint"
VERSION = 1
MB = float(2 ** 20)  # bytes per MB in every report, matching the original's 42.7 MB ResNet18


def save(path: str | Path, model: nn.Module, *, kind: str, class_names: list[str],
         classes: list[int] | None = None, metrics: dict | None = None,
         config: dict | None = None, extra: dict | None = None) -> Path:
    """Atomically write ``model`` (which must carry ``.spec``) with its metadata."""
    spec = getattr(model, "spec", None)
    if not isinstance(spec, dict):
        raise PapmError("model has no JSON spec; only models built by papm_core can be saved")
    meta = {"kind": kind, "spec": spec, "class_names": list(class_names),
            "classes": list(range(len(class_names))) if classes is None else [int(c) for c in classes],
            "metrics": metrics or {}, "config": config or {}, "provenance": provenance(),
            **(extra or {})}
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    blob = {"format": FORMAT, "version": VERSION, "meta": json.dumps(meta, default=str),
            "state_dict": state}
    return atomic_write(path, lambda p: torch.save(blob, p))


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) of a checkpoint, with one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise PapmError(f"checkpoint {path} does not exist; train one with 'papm train' or fix the path")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zips, foreign pickles, random bytes: all one message
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise PapmError(f"checkpoint {path} is corrupt, truncated or not a papm checkpoint "
                        f"({reason})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise PapmError(f"{path} is not a papm checkpoint (no '{FORMAT}' header)")
    if blob.get("version") != VERSION:
        raise PapmError(f"checkpoint {path} has format version {blob.get('version')}, "
                        f"this papm reads version {VERSION}; upgrade papm")
    try:
        meta = json.loads(blob["meta"])
        state = blob["state_dict"]
    except (KeyError, TypeError, ValueError) as e:
        raise PapmError(f"checkpoint {path} has damaged metadata ({e})") from e
    return state, meta


def load(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from its stored spec and load its weights (eval mode)."""
    state, meta = read(path)
    model = build_model(meta.get("spec"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PapmError(f"checkpoint {path}: weights do not match the stored spec "
                        f"({str(e).splitlines()[0][:120]})") from e
    return model.to(device).eval(), meta


def file_mb(path: str | Path) -> float:
    return Path(path).stat().st_size / MB


def param_mb(model: nn.Module) -> float:
    """fp32 size of the parameters and buffers, in MB (2**20 bytes)."""
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return n / MB
