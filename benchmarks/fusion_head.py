"""Fusion-head recipes on fixed device models: which head training closes the gap to the base?

Takes the pruned device models a finished ``sim.py`` run left in its node store, embeds the
public reference, validation and test sets once, and trains heads with:

- ``ce``: cross-entropy on the reference labels (the current default);
- ``ce+flip``: the same on the reference set and its horizontal flip (twice the samples);
- ``kd``: distillation from the base model's soft predictions on the reference set (the
  server holds the base model and the public set, so this needs nothing from the devices);
- ``kd+flip``: both;
- ``owner-only``: no training, each class scored by the mean log-probability the devices
  serving it give it (the head's specialist prior alone);
- ``owner``: the default head (``fuse.prior = "owner"``, ``papm_core.fusion.train_head``): the
  prior plus the MLP trained with cross-entropy, kept only if its paired validation gain over
  the prior reaches z >= 1.645 (``fuse.min_gain_z``);
- ``owner-any``: the same, keeping the MLP on any validation gain (``min_gain_z = 0``).

Selection on validation, test reported once per head. Example::

    python benchmarks/fusion_head.py --run runs/qs880 --base runs/base/base.pt --devices 2 5 10
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from papm_core import checkpoint  # noqa: E402
from papm_core.data import Split, load_dataset  # noqa: E402
from papm_core.fusion import (build_head, embed, embedding_dim, head_accuracy, random_mask,  # noqa: E402
                              train_head)
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
                    default=["ce", "ce+flip", "kd", "kd+flip", "owner-only", "owner-any", "owner"])
    ap.add_argument("--data", default=None)
    args = ap.parse_args()
    run = Path(args.run)
    base, meta = checkpoint.load(args.base or run / "base.pt")
    cfg = json.loads((run / "config.json").read_text())
    ds = load_dataset(args.data)
    _, ref, val = reference_splits(ds, base_split(meta), int(cfg["prune"]["ref_size"]))
    test = ds.test
    soft = {t: soft_targets(base.eval(), s, 4.0) for t, s in (("ref", ref), ("flip", flip(ref)))}
    rows = []
    for n in args.devices:
        res = json.loads((run / f"n{n}" / "result.json").read_text())
        models = [checkpoint.load(run / "store" / "pruned" / f"{d['key']}.pt")[0].eval() for d in res["per_device"]]
        feats = {name: torch.cat([torch.as_tensor(embed(m, s)) for m in models], 1)
                 for name, s in (("ref", ref), ("flip", flip(ref)), ("val", val), ("test", test))}
        dims = [embedding_dim(m) for m in models]
        owners = [d["classes"] for d in res["per_device"]]
        for recipe in args.recipes:
            xf, yf, sf = feats["ref"], ref.y, soft["ref"]
            if "flip" in recipe:
                xf, yf, sf = torch.cat([xf, feats["flip"]]), torch.cat([yf, ref.y]), torch.cat([sf, soft["flip"]])
            accs = []
            for seed in args.seeds:
                if recipe in ("owner", "owner-any"):  # the product's own training
                    fr = train_head(xf.numpy(), yf.numpy(), feats["val"].numpy(), val.y.numpy(), dims,
                                     len(ds.classes), seed=seed, owners=owners,
                                     min_gain_z=0.0 if recipe == "owner-any" else 1.645)
                    accs.append((fr.best_val, head_accuracy(fr.head, feats["test"], test.y)))
                    continue
                head, v = train(xf, yf, sf, feats["val"], val.y, dims, len(ds.classes), seed,
                                args.kd if recipe.startswith("kd") else 0.0,
                                epochs=0 if recipe == "owner-only" else 200,
                                owners=owners if recipe == "owner-only" else None)
                accs.append((v, head_accuracy(head, feats["test"], test.y)))
            pick = max(accs)
            rows.append({"N": n, "recipe": recipe, "val_pick": pick[0], "test_pick": pick[1],
                         "test_mean": float(np.mean([a[1] for a in accs]))})
            print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
