"""Fusion-head recipes on fixed device models: which head should the product train?

Takes the pruned device models a finished ``sim.py`` run left in its node store, embeds the
public reference, validation (and, with ``--test``, test) sets once, and trains heads with:

- ``ce``: the MLP alone (``fuse.prior = "none"``), cross-entropy on the reference labels;
- ``ce+flip``: the same on the reference set and its horizontal flip (twice the samples);
- ``kd``: distillation from the base model's soft predictions on the reference set;
- ``kd+flip``: both;
- ``owner-only``: no training, each class scored by the mean log-probability the devices
  serving it give it (the head's specialist prior alone);
- ``owner``: the prior plus the MLP (``fuse.prior = "owner"``, ``papm_core.fusion.train_head``),
  the epoch (0 = the prior alone) chosen on the selection half, no gate;
- ``owner+gate``: the product's head: ``owner``, then the MLP kept only if its gain over the
  prior on the gate half reaches z >= 1.645 (``fusion.gate``).

The validation split is cut into the product's two halves (``fusion.halves``): the selection
half picks each head's epoch and the seed; the **held-out half** (the product's gate half),
which picked nothing, compares the recipes (``held`` columns). For ``owner+gate`` the gate
also read that half, so its ``held`` figure is optimistic and is not used to choose. Test
figures only with ``--test``, for a final table after every choice is made. Example::

    python benchmarks/fusion_head.py --run runs/quick --base runs/quick/base.pt --devices 2 5 10
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from papm_core import checkpoint  # noqa: E402
from papm_core.config import FuseConfig  # noqa: E402
from papm_core.data import Split, load_dataset  # noqa: E402
from papm_core.embedding import embed, embedding_dim  # noqa: E402
from papm_core.fusion import build_head, gate, halves, head_accuracy, random_mask, train_head  # noqa: E402
from papm_core.loader import batches  # noqa: E402
from papm_core.specialize import base_split, reference_splits  # noqa: E402


def flip(s: Split) -> Split:
    return Split(s.name + "-flip", s.x.flip(3), s.y, s.classes)


@torch.no_grad()
def soft_targets(base, s: Split, temp: float) -> torch.Tensor:
    """The base model's softened predictions (temperature ``temp``) on a public split."""
    logits = torch.cat([base(x) for x, _ in batches(s, 500, train=False)])
    return F.softmax(logits / temp, 1)


def train(xf, yf, soft, vf, vy, dims, k, seed, kd, temp=4.0, epochs=200, patience=20, bs=128, lr=5e-4,
          owners=None):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head = build_head(dims, k, owners=owners)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    best, bad = (-1.0, None), 0
    if owners is not None:  # epoch 0: the prior alone (the MLP's last layer starts at zero)
        best = (head_accuracy(head, vf, vy), copy.deepcopy(head.state_dict()))
    for _ in range(epochs):
        head.train()
        order = torch.randperm(len(xf), generator=gen)
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            if len(idx) < 2:
                continue
            z = head(xf[idx], random_mask(len(idx), len(dims), 0.2, gen))
            loss = F.cross_entropy(z, yf[idx])
            if kd:
                kl = F.kl_div(F.log_softmax(z / temp, 1), soft[idx], reduction="batchmean") * temp ** 2
                loss = (1 - kd) * loss + kd * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        v = head_accuracy(head, vf, vy)
        if v > best[0]:
            best, bad = (v, copy.deepcopy(head.state_dict())), 0
        else:
            bad += 1
            if bad >= patience:
                break
    head.load_state_dict(best[1])
    return head.eval(), best[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/quick")
    ap.add_argument("--devices", type=int, nargs="+", default=[2, 5, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kd", type=float, default=0.9, help="weight of the distillation term")
    ap.add_argument("--base", default=None, help="base checkpoint (default: RUN/base.pt)")
    ap.add_argument("--recipes", nargs="+",
                    default=["ce", "ce+flip", "kd", "kd+flip", "owner-only", "owner", "owner+gate"])
    ap.add_argument("--data", default=None)
    ap.add_argument("--test", action="store_true", help="also report test figures (final tables only)")
    args = ap.parse_args()
    run = Path(args.run)
    base, meta = checkpoint.load(args.base or run / "base.pt")
    cfg = json.loads((run / "config.json").read_text())
    ds = load_dataset(args.data)
    c = reference_splits(ds, base_split(meta, int(cfg["prune"]["ref_size"]), float(cfg["prune"].get("node_val", 0.1))))
    ref, val = c.ref, c.val
    sel, held = (torch.as_tensor(i) for i in halves(val.y.numpy()))
    soft = {t: soft_targets(base.eval(), s, 4.0) for t, s in (("ref", ref), ("flip", flip(ref)))}
    sets = [("ref", ref), ("flip", flip(ref)), ("val", val)] + ([("test", ds.test)] if args.test else [])
    rows = []
    for n in args.devices:
        res = json.loads((run / f"n{n}" / "result.json").read_text())
        models = [checkpoint.load(run / "store" / "pruned" / f"{d['key']}.pt")[0].eval() for d in res["per_device"]]
        feats = {name: torch.cat([torch.as_tensor(embed(m, s)) for m in models], 1) for name, s in sets}
        dims = [embedding_dim(m) for m in models]
        owners = [d["classes"] for d in res["per_device"]]
        vs, vys, vh, vyh = feats["val"][sel], val.y[sel], feats["val"][held], val.y[held]
        for recipe in args.recipes:
            xf, yf, sf = feats["ref"], ref.y, soft["ref"]
            if "flip" in recipe:
                xf, yf, sf = torch.cat([xf, feats["flip"]]), torch.cat([yf, ref.y]), torch.cat([sf, soft["flip"]])
            heads = []
            for seed in args.seeds:
                if recipe.startswith("owner") and recipe != "owner-only":  # the product's own training
                    fr = train_head(xf.numpy(), yf.numpy(), vs.numpy(), vys.numpy(), dims, len(ds.classes),
                                    FuseConfig(), seed, owners)
                    heads.append((fr.best_val, fr))
                    continue
                head, v = train(xf, yf, sf, vs, vys, dims, len(ds.classes), seed,
                                args.kd if recipe.startswith("kd") else 0.0,
                                epochs=0 if recipe == "owner-only" else 200,
                                owners=owners if recipe == "owner-only" else None)
                heads.append((v, SimpleNamespace(head=head)))
            k = max(range(len(heads)), key=lambda i: (heads[i][0], -i))  # the seed, on the selection half
            if recipe == "owner+gate":
                gate(heads[k][1], vh.numpy(), vyh.numpy(), 1.645)
            row = {"N": n, "recipe": recipe, "val_sel_pick": heads[k][0],
                   "val_held_pick": head_accuracy(heads[k][1].head, vh, vyh),
                   "val_held_mean": float(np.mean([head_accuracy(h.head, vh, vyh) for _, h in heads]))}
            if args.test:
                row.update(test_pick=head_accuracy(heads[k][1].head, feats["test"], ds.test.y),
                           test_mean=float(np.mean([head_accuracy(h.head, feats["test"], ds.test.y)
                                                    for _, h in heads])))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
