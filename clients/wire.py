"""The message format shared by the ClientApp and the strategy: one JSON config record
plus named arrays, checked on arrival. Nothing is ever unpickled: arrays travel as
Flower ``Array`` (numpy ``.npy`` bytes, ``allow_pickle=False``), settings as JSON text.

Every reader names the key, dtype and shape it expects, so a malformed message (missing
key, wrong dtype or shape, oversized payload) becomes a one-line ``WireError`` that the
receiver turns into an error reply or a logged drop, and keeps working.

Example: ``python -c "from clients.wire import pack; print(pack({'a': 1}))"``
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from papm_core.models import build_model

MAX_ARRAY_BYTES = 256 * 2 ** 20   # any single array; 10,000 CIFAR images are 29 MiB
MAX_JSON_CHARS = 4 * 2 ** 20


class WireError(ValueError):
    """A message that does not have the shape this side expects."""


def pack(config: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> RecordDict:
    rd = RecordDict({"config": ConfigRecord({"json": json.dumps(config)})})
    if arrays:
        rd["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return rd


def config_of(content: RecordDict, required: tuple[str, ...] = ()) -> dict[str, Any]:
    rec = content.config_records.get("config")
    if rec is None or not isinstance(rec.get("json"), str):
        raise WireError("message has no 'config' record with a 'json' text")
    if len(rec["json"]) > MAX_JSON_CHARS:
        raise WireError(f"config of {len(rec['json'])} characters exceeds {MAX_JSON_CHARS}")
    try:
        cfg = json.loads(rec["json"])
    except ValueError as e:
        raise WireError(f"config is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise WireError("config JSON is not an object")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise WireError(f"config lacks key(s) {missing}")
    return cfg


def array(content: RecordDict, name: str, dtype: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """The named array, checked for dtype, rank, fixed dimensions and size before decoding."""
    rec = content.array_records.get("arrays")
    if rec is None or name not in rec:
        raise WireError(f"message lacks array '{name}'")
    a = rec[name]
    if a.dtype != dtype:
        raise WireError(f"array '{name}' has dtype {a.dtype}, expected {dtype}")
    if len(a.shape) != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
        raise WireError(f"array '{name}' has shape {tuple(a.shape)}, expected {shape}")
    nbytes = math.prod(a.shape) * np.dtype(dtype).itemsize
    if nbytes > MAX_ARRAY_BYTES or len(a.data) > MAX_ARRAY_BYTES + 4096:
        raise WireError(f"array '{name}' of {nbytes} bytes exceeds {MAX_ARRAY_BYTES}")
    out = a.numpy()
    if out.dtype != np.dtype(dtype) or out.shape != tuple(a.shape):
        raise WireError(f"array '{name}' does not decode to its declared dtype and shape")
    return out


def images(content: RecordDict, prefix: str) -> np.ndarray:
    """uint8 images [n, 3, H, W] sent under ``prefix``: images only, the server never sends
    labels of its validation or test split (nor of the public reference set)."""
    return array(content, f"{prefix}_x", "uint8", (None, 3, None, None))


def finite(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` if every value is finite; a NaN or inf embedding would poison the fusion head."""
    if not np.isfinite(a).all():
        raise WireError(f"array '{name}' holds non-finite values")
    return a


def model_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    # 0-d tensors (BatchNorm's step counter) travel as shape (1,): Flower arrays are >= 1-d
    return {f"w.{k}": v.detach().cpu().reshape(-1 if v.dim() == 0 else v.shape).numpy()
            for k, v in model.state_dict().items()}


def model_from(content: RecordDict, spec: dict) -> nn.Module:
    """Rebuild a model from its JSON spec and the message's ``w.*`` arrays (strict)."""
    rec = content.array_records.get("arrays")
    if rec is None:
        raise WireError("message lacks the model's arrays")
    try:
        model = build_model(spec)
        want = model.state_dict()
        state = {}
        for k, t in want.items():
            a = array(content, f"w.{k}", str(t.numpy().dtype), tuple(t.shape) or (1,))
            state[k] = torch.from_numpy(a.copy()).reshape(t.shape)
        model.load_state_dict(state, strict=True)
    except WireError:
        raise
    except Exception as e:  # a bad spec or weights: one line, never a crash of the node
        raise WireError(f"cannot rebuild the model ({str(e).splitlines()[0][:160]})") from None
    return model.eval()
