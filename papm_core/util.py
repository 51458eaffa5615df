"""Shared helpers: the one-line error type, atomic writes, provenance and devices.

Every user-facing failure raises ``PapmError``; the CLI prints its message on one
line and exits with status 2, so no traceback reaches the user.

Example: ``python -c "from papm_core.util import provenance; print(provenance())"``
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch


class PapmError(Exception):
    """An error whose message is complete on one line and says how to fix it."""


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp)`` then rename tmp onto ``path``, so readers never see a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; results should be readable as usual
    try:
        writer(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def git_commit() -> str:
    """The project's git commit (with '+dirty' when the tree has changes), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict[str, Any]:
    """Versions, commit and hardware, recorded beside every result."""
    import numpy

    from . import __version__

    info = {
        "papm": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return info


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; anything else is validated."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise PapmError(f"unknown device '{name}': use auto, cpu or cuda[:N]") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PapmError(f"device '{name}' asked for but CUDA is not available; use --device cpu")
    return dev


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(device: torch.device, precision: str = "auto") -> tuple[str, str]:
    """The precision training loops run in on ``device``, and why: ``("bf16" | "fp32", reason)``.

    ``auto`` is bf16 autocast on CUDA and on CPUs with native bf16 instructions (AMX or
    AVX512-BF16), where a training step is faster (docs/results.md, ``benchmarks/throughput.py``);
    fp32 elsewhere, where bf16 is emulated and slower. Losses and the optimiser stay fp32.
    """
    if precision not in PRECISIONS:
        raise PapmError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision, "asked for"
    if device.type == "cuda":
        return "bf16", "auto: CUDA"
    for probe, name in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
        has = getattr(torch.cpu, probe, None)
        if has and has():
            return "bf16", f"auto: the CPU has native bf16 ({name})"
    return "fp32", "auto: the CPU has no native bf16 (no AMX, no AVX512-BF16)"


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether training loops run under bf16 autocast (``resolve_precision``)."""
    return resolve_precision(device, precision)[0] == "bf16"


def precision_line(device: torch.device, precision: str = "auto") -> str:
    """``precision bf16 (auto: the CPU has native bf16 (AMX))``: for first lines of output."""
    name, why = resolve_precision(device, precision)
    return f"precision {name} ({why})"


def autocast(device: torch.device, precision: str = "auto"):
    """The training-loop autocast context for ``precision`` on ``device``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device, precision))


@contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` (> 0) inside the block, restored after;
    ``n`` <= 0 leaves it as it is."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
