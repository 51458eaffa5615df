"""Pruning quality side by side, and fine-tuning data scopes, for one device group.

``--mode criteria``: same base, same r, same fine-tuning budget and seeds; PAPM (alpha
0.5), APoZ only (alpha 0), L2 only (alpha 1), random channels, and Torch-Pruning's
global L2 group-magnitude pruner (its channel ratio bisected until the parameter
reduction lands in [r, r + 0.005]). ``--mode scopes``: PAPM with the fine-tuning scopes
shard, shard+public, all, and all with the original recipe.
Test accuracy is reported (overall and own classes); selection is on validation.

Needs ``pip install torch-pruning`` for the Torch-Pruning row (``pip install -e .[bench]``).

Example::

    python benchmarks/prune_quality.py --base runs/bench-train-quick/base.pt --classes 3 5 --epochs 5 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from papm_core import checkpoint
from papm_core.config import PruneConfig
from papm_core.data import load_dataset
from papm_core.finetune import finetune
from papm_core.models import build_model, count_params
from papm_core.specialize import base_split, device_data, prune, reference_splits, test_figures
from papm_core.util import provenance

CRITERIA = {"papm": dict(alpha=0.5), "apoz-only": dict(alpha=0.0), "l2-only": dict(alpha=1.0),
            "random": dict(criterion="random")}
SCOPES = {"shard": dict(scope="shard"), "shard+public": dict(scope="shard+public"),
          "all": dict(scope="all"), "all/original": dict(scope="all", recipe="original")}


def spec_from_modules(m) -> dict:
    """The width spec of a ResNet18 whose modules were resized in place."""
    return {"arch": "resnet18", "num_classes": m.linear.out_features, "stem": m.conv1.out_channels,
            "stages": [{"out": layer[0].conv2.out_channels, "inner": [b.conv1.out_channels for b in layer]}
                       for layer in (m.layer1, m.layer2, m.layer3, m.layer4)]}


def torch_pruning_model(base, r: float):
    import torch_pruning as tp

    p0 = count_params(base)
    lo, hi, best = 0.0, 1.0, None
    for _ in range(20):
        ratio = (lo + hi) / 2
        m = copy.deepcopy(base).eval()
        tp.pruner.MagnitudePruner(m, torch.randn(1, 3, 32, 32),
                                  importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  global_pruning=True, pruning_ratio=ratio,
                                  ignored_layers=[m.linear]).step()
        red = 1 - count_params(m) / p0
        if red >= r:
            hi, best = ratio, (m, red)
            if red <= r + 0.005:
                break
        else:
            lo = ratio
    m, red = best
    clean = build_model(spec_from_modules(m))
    clean.load_state_dict(m.state_dict())
    return clean, red, ratio


def run_one(name, overrides, base, meta, ds, args, seed):
    cfg = PruneConfig(classes=args.classes, params_reduction=args.r, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, seed=seed, **overrides).validate()
    data = device_data(ds, meta, cfg, "cpu")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if name == "torch-pruning":
        model, red, ratio = torch_pruning_model(base, args.r)
        model = finetune(model, base, data.shard, data.val, cfg, ref=data.ref, pool=data.pool).model
    else:
        res = prune(base, data, cfg)
        model, red = res.model, res.report["reduction"]
    # validation by default (the server's split: the devices never selected on it); test only
    # with --test, for a final table once the choice is made
    split = ds.test if args.test else reference_splits(ds, base_split(meta, cfg.ref_size, cfg.node_val)).val
    figs = test_figures(model, split, args.classes)
    return {"method": name, "seed": seed, "reduction": round(red, 4), "split": split.name, "acc": figs["test_acc"],
            "own_acc": figs["test_own_acc"], "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--data")
    ap.add_argument("--mode", choices=["criteria", "scopes"], default="criteria")
    ap.add_argument("--classes", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--r", type=float, default=0.77)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", help="run only these methods/scopes")
    ap.add_argument("--json")
    ap.add_argument("--test", action="store_true", help="report on the test split (final tables only)")
    args = ap.parse_args()
    base, meta = checkpoint.load(args.base)
    ds = load_dataset(args.data)
    table = dict(CRITERIA, **{"torch-pruning": {}}) if args.mode == "criteria" else SCOPES
    rows = []
    for name, over in table.items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            row = run_one(name, over, base, meta, ds, args, seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
    split = "test" if args.test else "val"
    print(f"\n| {args.mode[:-1] if args.mode == 'scopes' else 'method'} | reduction | own-class {split} acc % "
          f"| 10-class {split} acc % |\n|---|---|---|---|")
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        own, all_ = [r["own_acc"] for r in rs], [r["acc"] for r in rs]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        print(f"| {name} | {rs[0]['reduction']:.4f} | {statistics.mean(own):.2f} ± {sd(own):.2f} "
              f"| {statistics.mean(all_):.2f} ± {sd(all_):.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "provenance": provenance()}, fh, indent=1)


if __name__ == "__main__":
    main()
