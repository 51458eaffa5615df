"""Fused accuracy by device count, centrally: prune every group once, fuse per N, evaluate.

For each N in ``--devices``, takes the groups from ``papm group``'s groups.json, prunes
(and fine-tunes) each distinct group once per recipe (reusing an existing checkpoint of
the same name), trains the fusion head and evaluates it in split mode with the base
model in the same run. Recipes: ``default`` (PAPM, scope shard+public) and ``original``
(scope all, the original's sampling and class weights; the original fusion settings).

With ``--preset quick`` every device fine-tunes with that preset's settings (epochs, lr,
batch size, widths in multiples of 8, distillation weight, precision) and the default
recipe's head uses the preset's ``[fuse]`` table; ``original`` keeps the original's head
settings. Explicit ``--epochs``/``--lr``/``--batch-size``/``--ce-weight``/``--augment`` win over both.

Examples::

    python benchmarks/fusion.py --base runs/q/base.pt --groups runs/g/groups.json --devices 2 5 10 --epochs 3
    python benchmarks/fusion.py --base runs/quick/base.pt --groups runs/quick/n2/grouping.json \
        --devices 2 --preset quick --seed 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from papm_core import checkpoint
from papm_core.config import FuseConfig, PruneConfig, load_preset
from papm_core.data import cache_dir, load_dataset
from papm_core.grouping import read_groups
from papm_core.specialize import base_split, device_data, output_name, prune, save_result, test_figures
from papm_core.system import fuse_checkpoints, split_eval
from papm_core.util import file_sha256, provenance

RECIPES = {"default": dict(scope="shard+public"), "original": dict(scope="all", recipe="original")}


def ensure_device(group, recipe, args, base, meta, ds, out_dir: Path) -> Path:
    path = out_dir / f"{output_name(group, args.r)}.pt"
    if path.is_file():
        return path
    cfg = PruneConfig() if args.preset is None else load_preset(args.preset, "prune", classes=group)
    given = {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "ce_weight", "augment", "min_steps")
             if getattr(args, k) is not None}
    for k, v in {**given, "classes": group, "params_reduction": args.r, "seed": args.seed,
                 **RECIPES[recipe]}.items():
        setattr(cfg, k, v)
    cfg.validate()
    res = prune(base, device_data(ds, meta, cfg, "cpu"), cfg, teacher_cache=cache_dir() / "teacher")
    if args.test:  # final tables only: every choice is made on validation
        res.report.update(test_figures(res.model, ds.test, group))
    save_result(res, cfg, ds.classes, str(out_dir), {
        "path": args.base, "sha256": file_sha256(args.base), "split": base_split(meta, cfg.ref_size, cfg.node_val)})
    ft = res.report["finetune"] or {}
    print(f"  pruned {group} ({recipe}): held-out loss {ft.get('best_val_loss', float('nan')):.4f}"
          + (f", test own {res.report['test_own_acc']:.2f}%, all {res.report['test_acc']:.2f}%" if args.test else "")
          + f", {res.report['finetune_seconds']:.0f} s", flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--groups", required=True)
    ap.add_argument("--data")
    ap.add_argument("--devices", type=int, nargs="+", default=[2, 5, 10])
    ap.add_argument("--recipes", nargs="+", default=["default", "original"])
    ap.add_argument("--r", type=float, default=0.77)
    ap.add_argument("--preset", help="take device and head settings from this preset (e.g. quick)")
    ap.add_argument("--epochs", type=int, help="default: the preset's, else 3")
    ap.add_argument("--min-steps", type=int, help="at least this many steps per device (default: the preset's)")
    ap.add_argument("--batch-size", type=int, help="default: the preset's, else 128")
    ap.add_argument("--lr", type=float, help="default: the preset's, else 0.05")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ce-weight", type=float, help="default: the preset's, else 1")
    ap.add_argument("--augment", choices=["crop+flip", "flip"], help="default: the preset's")
    ap.add_argument("--tag", default="", help="suffix of the per-recipe output folder")
    ap.add_argument("--out", default="runs/bench-fusion")
    ap.add_argument("--test", action="store_true", help="also measure on the test split (final tables only)")
    args = ap.parse_args()
    if args.preset is None:  # the settings this benchmark used before presets existed
        for k, v in (("epochs", 3), ("batch_size", 128), ("lr", 0.05), ("ce_weight", 1.0)):
            setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    base, meta = checkpoint.load(args.base)
    ds = load_dataset(args.data)
    groups = read_groups(args.groups)
    rows = []
    for recipe in args.recipes:
        out_dir = Path(args.out) / f"{recipe}{args.tag}-seed{args.seed}"
        for n in args.devices:
            paths = [ensure_device(g, recipe, args, base, meta, ds, out_dir) for g in groups[n]]
            head = out_dir / f"fusion_n{n}.pt"
            fcfg = FuseConfig()
            if recipe == "original":
                fcfg = FuseConfig(device_dropout=0.0, prior="none")  # the original: a plain MLP, no dropout
            elif args.preset is not None:
                f = load_preset(args.preset, "fuse")
                fcfg = FuseConfig(epochs=f.epochs, patience=f.patience, lr=f.lr, batch_size=f.batch_size,
                                  device_dropout=f.device_dropout, prior=f.prior)
            fused = fuse_checkpoints(paths, head, args.data, fcfg, args.seed)
            row = {"recipe": recipe, "devices": n, "seed": args.seed, "fused_val_sel": fused["val_acc"],
                   "head": fused["head"], "gate": fused["gate"]}
            if args.test:
                r = split_eval(head, args.base, args.data)
                row.update(base_acc=r["base"]["test_acc"], fused_acc=r["test_acc"],
                           missing_one_worst=r["missing_one_worst"], max_device_latency_ms=max(r["device_latency_ms"]),
                           base_latency_ms=r["base"]["latency_ms"], end_to_end_ms=r["end_to_end_ms"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    test_cols = " base test % | fused test % |" if args.test else ""
    print("\n| recipe | N | fused val (selection half) % | head |" + test_cols)
    print("|---|---|---|---|" + ("---|---|" if args.test else ""))
    for r in rows:
        print(f"| {r['recipe']} | {r['devices']} | {r['fused_val_sel']:.2f} | {r['head']} |"
              + (f" {r['base_acc']:.2f} | {r['fused_acc']:.2f} |" if args.test else ""))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    counts = "-".join(str(n) for n in args.devices)
    (Path(args.out) / f"fusion-n{counts}-seed{args.seed}.json").write_text(
        json.dumps({"args": vars(args), "rows": rows, "provenance": provenance()}, indent=1))


if __name__ == "__main__":
    main()
