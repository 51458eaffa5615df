"""Which images a simulated node holds (``sim.holdings``), as Flower users partition data.

- ``group`` (default): before grouping each class goes to one node (``nodedata.held_classes``);
  once grouped, node i holds exactly the shard of group i. The grouping fits the data.
- ``dirichlet:A``: every class's images are spread over the nodes in proportions drawn
  from Dirichlet(A) (A > 0; small A = skewed, 0.5 is the common non-IID setting).
- ``classes:K``: each node holds K classes (a seeded cyclic deal, so every class is held
  when K x nodes >= classes); a class's images are split evenly among its holders.

A single node (the N = 1 reference every run includes) holds every image under any spec.
With ``dirichlet`` and ``classes`` the holdings are fixed, as on real edge boxes: each
group goes to the node holding most images of its classes (``federation.match_groups``)
and a node trains on the images of its group's classes that it holds. The training
images and the node's held-out images are cut by the same proportions, and the parts
of all nodes together are exactly the whole split, so the merged class statistics (and
the grouping) do not depend on the holdings.

Example: ``python -c "from papm_core.holdings import shares; print(shares('classes:2', 5, 10, 0))"``
"""

from __future__ import annotations

import numpy as np
import torch

from .util import PapmError

KINDS = ("group", "dirichlet", "classes")
FIX = "set sim.holdings to group, dirichlet:A (A > 0) or classes:K (K >= 1)"


def parse(spec: str) -> tuple[str, float]:
    """``"dirichlet:0.5"`` -> ("dirichlet", 0.5); a malformed spec is one line."""
    kind, _, arg = str(spec).strip().partition(":")
    if kind not in KINDS or (kind == "group") != (arg == ""):
        raise PapmError(f"holdings {spec!r} is not understood; {FIX}")
    if kind == "group":
        return kind, 0.0
    try:
        value = float(arg)
    except ValueError:
        raise PapmError(f"holdings {spec!r}: {arg!r} is not a number; {FIX}") from None
    if value <= 0 or (kind == "classes" and value != int(value)):
        raise PapmError(f"holdings {spec!r} is out of range; {FIX}")
    return kind, value


def check(spec: str, nodes: int, num_classes: int) -> None:
    """Fails now (one line) when the holdings cannot cover every class with ``nodes``."""
    kind, value = parse(spec)
    if kind == "classes" and nodes > 1:  # one node (the N = 1 reference) holds every image
        k = int(value)
        if k > num_classes:
            raise PapmError(f"holdings {spec}: {k} classes per node, but the data has {num_classes}")
        if k * nodes < num_classes:
            raise PapmError(f"holdings {spec} with {nodes} devices holds {k * nodes} of {num_classes} "
                            f"classes; use K >= {-(-num_classes // nodes)} or more devices")


def shares(spec: str, nodes: int, num_classes: int, seed: int) -> np.ndarray:
    """[classes, nodes] share of each class's images held by each node (rows sum to 1);
    the same for every caller with the same arguments. Not defined for ``group``."""
    kind, value = parse(spec)
    check(spec, nodes, num_classes)
    if nodes == 1:
        return np.ones((num_classes, 1))
    rng = np.random.default_rng([seed, nodes, num_classes])
    if kind == "dirichlet":
        # redraw (as Flower Datasets' DirichletPartitioner does) until every node holds at
        # least a fifth of a fair share: an empty node would only be masked
        for _ in range(1000):
            p = rng.dirichlet(np.full(nodes, value), size=num_classes)
            if p.sum(0).min() >= 0.2 * num_classes / nodes:
                return p
        raise PapmError(f"holdings {spec}: no draw gives each of {nodes} nodes a fifth of a fair "
                        f"share of images; use a larger A")
    if kind == "classes":
        k, order = int(value), rng.permutation(num_classes)
        p = np.zeros((num_classes, nodes))
        for node in range(nodes):
            p[order[[(node * k + j) % num_classes for j in range(k)]], node] = 1.0
        return p / p.sum(1, keepdims=True)
    raise PapmError(f"holdings {spec} has no shares: a group node holds its group's shard")


def part(y: torch.Tensor, p: np.ndarray, node: int, seed: int) -> torch.Tensor:
    """Indices of the images (labels ``y``) that ``node`` holds under shares ``p``: each
    class's images in a seeded order, cut at the cumulative shares, so the nodes' parts
    are disjoint and together hold every image."""
    y = y.cpu().numpy()
    keep = []
    for c in range(p.shape[0]):
        idx = np.flatnonzero(y == c)
        idx = idx[np.random.default_rng([seed, c]).permutation(len(idx))]
        cuts = np.rint(np.concatenate([[0.0], np.cumsum(p[c])]) * len(idx)).astype(int)
        keep.append(idx[cuts[node]:cuts[node + 1]])
    return torch.from_numpy(np.sort(np.concatenate(keep))).long()
