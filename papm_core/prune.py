"""PAPM channel scoring, exact-budget width search and physical slimming of ResNet18.

Scoring is separate from cutting (as in Torch-Pruning):

- ``apoz(model, calib)``: per prunable unit, the fraction of exactly-zero activations
  after the BN and ReLU that follow each conv, accumulated over every calibration batch.
- ``weight_norms(model)``: per unit, the L2 norm of each output channel's filter,
  divided by the largest norm in that conv, so it lies in [0, 1].
- ``papm_scores``: ``alpha * norm + (1 - alpha) * (1 - APoZ)``; criteria are small
  callables picked by name from ``CRITERIA`` (``prune.criterion``: papm | random).
- ``search_keep``: which channels each unit keeps so that ``1 - P/P0`` lies in
  ``[r, r + 0.005]`` exactly (see its doc), or fits a file size.
- ``slim(model, keep)``: a dense, smaller ResNet18 built from the new width spec.

Units: each block's inner conv is a unit of its own. Channels tied by a residual
addition form one group unit: the stem with stage 1 (identity shortcuts), and for
stages 2-4 both blocks' second conv plus the stage's 1x1 shortcut conv. A group's APoZ
is the mean over its activation points (stem ReLU, each block's post-addition ReLU);
its weight norm is the mean of its member convs' normalised norms.

Example: ``papm prune --base checkpoints/base.pt --classes 3 5 --params-reduction 0.77``
"""

from __future__ import annotations

import copy
import heapq
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .data import Split
from .loader import batches
from .models import ResNet18, build_model, channel_plan, spec_params, with_widths
from .util import PapmError

TOLERANCE = 0.005  # the achieved reduction may exceed the target by at most half a point


@dataclass
class Unit:
    """A set of output channels pruned together."""

    name: str
    convs: list[tuple[nn.Conv2d, nn.BatchNorm2d]]  # producers of these channels
    acts: list[tuple[nn.Module, str]] = field(default_factory=list)  # ('bn': <=0 | 'out': ==0)

    @property
    def width(self) -> int:
        return self.convs[0][0].out_channels


def units(model: ResNet18) -> list[Unit]:
    """The prunable units of a ResNet18 (``models.channel_plan``), each listed after the
    last conv that writes it (forward order)."""
    plan = channel_plan(model.spec)
    last = {c.out: i for i, c in enumerate(plan)}
    out: dict[str, Unit] = {}
    for c in plan:
        u = out.setdefault(c.out, Unit(c.out, []))
        u.convs.append((model.get_submodule(c.conv), model.get_submodule(c.bn)))
        if c.act:  # "bn": ReLU(BN) = 0 iff BN <= 0; "out": the block's post-addition ReLU
            u.acts.append((model.get_submodule(c.bn if c.act == "bn" else c.conv.rsplit(".", 1)[0]), c.act))
    return [out[name] for name in sorted(out, key=last.get)]


@torch.no_grad()
def apoz(model: ResNet18, calib: Split, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per unit, per channel: fraction of exactly-zero post-ReLU activations over ``calib``."""
    model.eval()
    us = units(model)
    zeros: dict[int, torch.Tensor] = {}
    totals: dict[int, int] = {}

    def hook(kind):
        def fn(mod, _inp, out):
            z = (out <= 0) if kind == "bn" else (out == 0)  # bn: ReLU(x)=0 iff x<=0
            zeros[id(mod)] = zeros.get(id(mod), 0) + z.sum(dim=(0, 2, 3)).double()
            totals[id(mod)] = totals.get(id(mod), 0) + out.shape[0] * out.shape[2] * out.shape[3]
        return fn

    handles = [m.register_forward_hook(hook(k)) for u in us for m, k in u.acts]
    try:
        dev = next(model.parameters()).device
        for x, _ in batches(calib.to(dev), batch_size, train=False):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {u.name: np.mean([(zeros[id(m)] / totals[id(m)]).cpu().numpy() for m, _ in u.acts], axis=0)
            for u in us}


@torch.no_grad()
def weight_norms(model: ResNet18) -> dict[str, np.ndarray]:
    """Per unit: L2 norm of each output filter / the conv's largest, averaged over members."""
    out = {}
    for u in units(model):
        per = []
        for conv, _ in u.convs:
            n = conv.weight.detach().flatten(1).norm(dim=1).double().cpu().numpy()
            per.append(n / n.max() if n.max() > 0 else n)
        out[u.name] = np.mean(per, axis=0)
    return out


def papm_scores(rates: dict[str, np.ndarray], norms: dict[str, np.ndarray],
                alpha: float = 0.5) -> dict[str, np.ndarray]:
    """``alpha * norm + (1 - alpha) * (1 - APoZ)`` per channel (higher = kept first)."""
    if not 0.0 <= alpha <= 1.0:
        raise PapmError(f"--alpha must lie in [0, 1], got {alpha}")
    return {k: alpha * norms[k] + (1.0 - alpha) * (1.0 - rates[k]) for k in rates}


@dataclass(frozen=True)
class Papm:
    """The PAPM criterion: ``papm_scores`` at weight ``alpha`` on the normalised norm."""

    alpha: float = 0.5

    def __call__(self, rates: dict[str, np.ndarray], norms: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return papm_scores(rates, norms, self.alpha)


@dataclass(frozen=True)
class Random:
    """A baseline: uniform random channel scores from ``seed`` (same shapes as APoZ)."""

    seed: int = 0

    def __call__(self, rates: dict[str, np.ndarray], norms: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return {k: rng.random(len(v)) for k, v in rates.items()}


# ``prune.criterion`` -> the criterion built from a PruneConfig: each is a callable
# (APoZ rates, normalised norms) -> per-unit channel scores, as Torch-Pruning's importances
CRITERIA = {"papm": lambda cfg: Papm(cfg.alpha), "random": lambda cfg: Random(cfg.seed)}


def spec_for(model: ResNet18, keep: dict[str, list[int]]) -> dict:
    """The width spec of ``model`` with each unit's width replaced by its kept count."""
    return with_widths(model.spec, {u: len(k) for u, k in keep.items()})


def _ranked(scores: np.ndarray) -> list[int]:
    """Channel indices from lowest to highest score (ties: higher index first)."""
    return sorted(range(len(scores)), key=lambda c: (scores[c], -c))


def search_keep(model: ResNet18, scores: dict[str, np.ndarray], reduction: float,
                min_channels: int = 8, round_to: int = 1, tol: float = TOLERANCE
                ) -> tuple[dict[str, list[int]], float]:
    """Channels to keep per unit so that ``1 - P/P0`` lies in [reduction, reduction + tol].

    A global threshold on the score, walked upward one removal step at a time: each
    unit offers its lowest-scored ``round_to`` channels (fewer only to reach a multiple
    of ``round_to``), and the step with the globally lowest score is taken. A step
    that would overshoot ``reduction + tol`` closes that unit and the walk goes on with
    the next lowest, so the budget is met from above by at most ``tol``. Returns the
    kept channels and the threshold (score of the last channel removed).
    """
    if not 0.0 < reduction < 1.0:
        raise PapmError(f"--params-reduction must lie in (0, 1), got {reduction}")
    order = {u: _ranked(s) for u, s in scores.items()}
    width = {u: len(s) for u, s in scores.items()}
    p0 = spec_params(model.spec)
    floor = {u: min(w, max(min_channels, 1)) for u, w in width.items()}

    def step(u: str) -> int:
        w = width[u]
        n = (w % round_to) or round_to if round_to > 1 else 1
        return n if w - n >= floor[u] else 0

    def params_after(u: str, n: int) -> int:
        width[u] -= n
        p = spec_params(spec_for(model, {k: range(v) for k, v in width.items()}))
        width[u] += n
        return p

    heap = [(float(scores[u][order[u][step(u) - 1]]), u) for u in width if step(u)]
    heapq.heapify(heap)
    removed = {u: 0 for u in width}
    p, threshold = p0, 0.0
    while 1 - p / p0 < reduction and heap:
        score, u = heapq.heappop(heap)
        n = step(u)
        p_new = params_after(u, n)
        if 1 - p_new / p0 > reduction + tol:
            continue  # too big a step here: this unit is closed, try finer ones
        width[u] -= n
        removed[u] += n
        p, threshold = p_new, score
        nxt = step(u)
        if nxt:
            heapq.heappush(heap, (float(scores[u][order[u][removed[u] + nxt - 1]]), u))
    if 1 - p / p0 < reduction:
        raise PapmError(f"cannot reach a {reduction:.3f} parameter reduction under --min-channels "
                        f"{min_channels} --round-to {round_to} (best {1 - p / p0:.4f}); "
                        "lower --min-channels or the target")
    keep = {u: sorted(order[u][removed[u]:]) for u in width}
    return keep, threshold


def keep_by_threshold(scores: dict[str, np.ndarray], threshold: float, min_channels: int = 8,
                      higher_is_worse: bool = True) -> dict[str, list[int]]:
    """Classic fixed-threshold pruning: drop channels whose score passes ``threshold``
    (APoZ above it when ``higher_is_worse``), keeping at least ``min_channels``."""
    keep = {}
    for u, s in scores.items():
        bad = s > threshold if higher_is_worse else s < threshold
        kept = [c for c in range(len(s)) if not bad[c]]
        if len(kept) < min(min_channels, len(s)):
            best = sorted(range(len(s)), key=lambda c: s[c] if higher_is_worse else -s[c])
            kept = sorted(best[:min(min_channels, len(s))])
        keep[u] = kept
    return keep


def channel_rank_keep(rates: dict[str, np.ndarray], reduction: float,
                      min_channels: int = 8) -> tuple[dict[str, list[int]], float]:
    """The original project's rule: T = the k-th largest APoZ over all N channels with
    k = round(N * r); channels with APoZ >= T are dropped (r counts channels, not params)."""
    allv = np.sort(np.concatenate(list(rates.values())))[::-1]
    k = int(round(len(allv) * reduction))
    t = float(allv[max(k - 1, 0)])
    return keep_by_threshold(rates, np.nextafter(t, -np.inf), min_channels), t


@torch.no_grad()
def slim(model: ResNet18, keep: dict[str, list[int]]) -> ResNet18:
    """A dense model of the same class holding only the kept channels' weights: each conv
    keeps the output channels of the unit it writes and the input channels of the unit it
    reads (``models.channel_plan``), each BN those of its conv's unit."""
    new = build_model(spec_for(model, keep)).to(next(model.parameters()).device)
    idx = {u: torch.tensor(k) for u, k in {**keep, "input": [0, 1, 2]}.items()}
    for c in channel_plan(model.spec):
        new.get_submodule(c.conv).weight.copy_(model.get_submodule(c.conv).weight[idx[c.out]][:, idx[c.inp]])
        old_bn, new_bn = model.get_submodule(c.bn), new.get_submodule(c.bn)
        for t in ("weight", "bias", "running_mean", "running_var"):
            getattr(new_bn, t).copy_(getattr(old_bn, t)[idx[c.out]])
        new_bn.num_batches_tracked.copy_(old_bn.num_batches_tracked)
    last = f"stage{len(model.spec['stages'])}"
    new.linear.weight.copy_(model.linear.weight[:, idx[last]])
    new.linear.bias.copy_(model.linear.bias)
    return new.eval()


@torch.no_grad()
def zeroed(model: ResNet18, keep: dict[str, list[int]]) -> ResNet18:
    """A copy of ``model`` whose dropped channels are zeroed (BN scale and shift = 0),
    which computes exactly what ``slim`` computes: for tests and explanations."""
    m = copy.deepcopy(model).eval()
    for u, mu in zip(units(model), units(m)):
        drop = sorted(set(range(u.width)) - set(keep[u.name]))
        for _, bn in mu.convs:
            bn.weight[drop] = 0.0
            bn.bias[drop] = 0.0
    return m
