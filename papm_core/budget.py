"""Device budgets in one syntax, and the searches that meet the size and latency ones.

A budget is ``0.77`` (parameter reduction 1 - P/P0), ``1.2MB`` (saved checkpoint size, MB =
2**20 bytes) or ``2.5ms`` (batch-1 latency on the machine that prunes, which on an edge box
is the box itself). A fleet budget ``1.0x`` gives each of N devices 1/N of that multiple of
the base model's parameters, so device counts are compared at equal total cost.

The latency search (``fit_latency``) slims candidate models on a 0.5-point grid of parameter
reductions and times each in the device's runtime (``torch``, ``onnxruntime`` or
``onnxruntime-int8``) by the report's method (``evaluate.quietest_median_ms``), twice in
fresh sessions, keeping the slower figure. It bisects for the smallest reduction whose
model runs at or under the target (about 9 candidates); a target below the smallest model
the settings allow, or within the two timings' spread of it, fails in one line.

Example: ``papm prune --base checkpoints/base.pt --classes 3 5 --budget 2.5ms --runtime onnxruntime``
"""

from __future__ import annotations

import io
import math
import re
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from . import checkpoint
from .config import PruneConfig
from .evaluate import latency_ms
from .models import spec_params
from .prune import search_keep, slim, spec_for
from .util import PapmError

STEP = 0.005  # the reduction grid of the size and latency searches (the budget search's tolerance)
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(mb|ms|x)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    kind: str      # "reduction" | "mb" | "ms" | "x" (fleet multiple of the base's parameters)
    value: float

    def __str__(self) -> str:
        return f"{self.value:g}{ {'reduction': '', 'mb': 'MB'}.get(self.kind, self.kind)}"


def parse(text: str, where: str = "budget", fleet: bool = False) -> Budget:
    """``0.77`` / ``1.2MB`` / ``2.5ms`` (or ``1.0x`` with ``fleet``), checked; one line naming ``where``."""
    m = _BUDGET.match(str(text))
    kind = (m.group(2) or "reduction").lower() if m else None
    if not m or (kind == "x") != fleet:
        want = "a multiple of the base's parameters such as 1.0x" if fleet else \
            "a parameter reduction such as 0.77, a size such as 1.2MB or a latency such as 2.5ms"
        raise PapmError(f"{where} = {text!r}: expected {want}")
    value = float(m.group(1))
    if kind == "reduction" and not 0 < value < 1 or value <= 0:
        raise PapmError(f"{where} = {text!r}: a parameter reduction lies in (0, 1); sizes, latencies "
                        "and fleet multiples are positive")
    return Budget(kind, value)


def parse_list(text: str, where: str) -> list[Budget]:
    """``"0.5, 0.9, 2.5ms"`` -> budgets cycled over devices in device order (empty: none)."""
    return [parse(t, where) for t in str(text).split(",") if t.strip()]


def of(cfg: PruneConfig) -> Budget:
    """The one target ``cfg`` prunes to, as a budget (the inverse of ``apply``)."""
    if cfg.target_size_mb is not None:
        return Budget("mb", cfg.target_size_mb)
    if cfg.target_latency_ms is not None:
        return Budget("ms", cfg.target_latency_ms)
    return Budget("reduction", cfg.params_reduction)


def apply(cfg: PruneConfig, b: Budget) -> PruneConfig:
    """``cfg`` with budget ``b`` as its one target (reduction, size or latency)."""
    if b.kind == "reduction":
        return replace(cfg, params_reduction=b.value, target_size_mb=None, target_latency_ms=None)
    if b.kind == "mb":
        return replace(cfg, target_size_mb=b.value, target_latency_ms=None)
    return replace(cfg, target_latency_ms=b.value, target_size_mb=None)


def fleet_reduction(fleet: Budget, n: int) -> float:
    """Each of ``n`` devices' parameter reduction under a fleet budget of ``fleet.value`` x P0
    (at least one grid step: a single device at 1.0x is the base model less one step)."""
    return float(min(1 - STEP, max(STEP, 1 - fleet.value / n)))


def _file_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save({k: t.cpu() for k, t in model.state_dict().items()}, buf)
    return buf.tell()


def fit_size(base, scores, cfg: PruneConfig) -> tuple[dict, float]:
    """Smallest reduction (0.5-point steps) whose slimmed file fits ``target_size_mb``,
    starting from the proportional estimate 1 - budget / base file size."""
    budget = cfg.target_size_mb * checkpoint.MB - 64 * 1024  # bytes; 64 KB for metadata
    r = max(STEP, 1 - budget / max(1.0, _file_bytes(base)))
    while r < 1.0:
        keep, thr = search_keep(base, scores, r, cfg.min_channels, cfg.round_to)
        if _file_bytes(slim(base, keep)) <= budget:
            return keep, thr
        r += STEP
    raise PapmError(f"no pruning fits {cfg.target_size_mb} MB under --min-channels {cfg.min_channels}")


def time_ms(model: nn.Module, runtime: str, calib: torch.Tensor, runs: int = 200) -> dict:
    """Batch-1 latency of ``model`` in ``runtime``: ``ms``, the slower of two timings, each in
    a fresh session after its own warm-up (one timing's quietest block can flatter it), and
    ``spread_ms``, their difference: the noise a target must clear."""
    model = model.float().eval()
    if runtime == "torch":
        times = [latency_ms(model, runs)["median_ms"] for _ in range(2)]
    else:
        from .export import candidate_latency_ms  # onnx is an optional extra

        times = candidate_latency_ms(model, runtime == "onnxruntime-int8", calib, runs)
    return {"ms": max(times), "spread_ms": abs(times[0] - times[1])}


def _deepest(base, scores, cfg: PruneConfig) -> int:
    """The largest grid index i whose reduction STEP * i the width floor (--min-channels) allows."""
    p0 = spec_params(base.spec)
    floor = {u: range(min(len(s), cfg.min_channels)) for u, s in scores.items()}
    i = math.floor((1 - spec_params(spec_for(base, floor)) / p0) / STEP)
    while i > 1:
        try:
            search_keep(base, scores, STEP * i, cfg.min_channels, cfg.round_to)
            return i
        except PapmError:  # --round-to can keep the floor from the last steps
            i -= 1
    return 1


def fit_latency(base, scores, cfg: PruneConfig, calib: torch.Tensor) -> tuple[dict, float, dict]:
    """Kept channels and threshold of the smallest grid reduction whose slimmed model runs at
    or under ``cfg.target_latency_ms`` in ``cfg.runtime`` here, and the search's record."""
    t0, target, rt = time.perf_counter(), float(cfg.target_latency_ms), cfg.runtime
    tried: dict[int, tuple] = {}

    def at(i: int) -> tuple:
        if i not in tried:
            keep, thr = search_keep(base, scores, STEP * i, cfg.min_channels, cfg.round_to)
            tried[i] = (keep, thr, time_ms(slim(base, keep), rt, calib))
        return tried[i]

    base_t = time_ms(base, rt, calib)
    n = _deepest(base, scores, cfg)
    floor = at(n)[2]
    if floor["ms"] > target:
        raise PapmError(f"a {target:g} ms target in {rt} is out of reach here: the smallest model "
                        f"--min-channels {cfg.min_channels} allows runs in {floor['ms']:.2f} ms (the base "
                        f"{base_t['ms']:.2f} ms); raise the target, lower --min-channels or pick a faster --runtime")
    if target - floor["ms"] < floor["spread_ms"]:
        raise PapmError(f"a {target:g} ms target in {rt} cannot be told apart from timing noise: the smallest "
                        f"model runs in {floor['ms']:.2f} ± {floor['spread_ms']:.2f} ms; raise the target to at "
                        f"least {floor['ms'] + floor['spread_ms']:.2f} ms")
    lo, hi = 0, n  # at(hi) meets the target; lo = 0 stands for "not yet shown to"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if at(mid)[2]["ms"] <= target else (mid, hi)
    keep, thr, got = at(hi)
    record = {"target_ms": target, "runtime": rt, "achieved_ms": got["ms"], "spread_ms": got["spread_ms"],
              "reduction": round(STEP * hi, 4), "base_ms": base_t["ms"], "smallest_ms": floor["ms"],
              "candidates": [{"reduction": round(STEP * i, 4), "ms": t[2]["ms"]} for i, t in sorted(tried.items())],
              "seconds": time.perf_counter() - t0}
    return keep, thr, record
