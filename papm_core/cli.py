"""The ``papm`` command: thin argparse front-ends over the papm_core stages.

Every failure the user can fix prints one line (``papm: error: ...``) and exits 2;
no traceback. Set ``PAPM_DEBUG=1`` to see the traceback anyway.

Examples::

    papm train --width 0.25 --epochs 10 --data ../shared/data/cifar10-jpeg75.tar.xz
    papm eval checkpoints/base.pt --data ../shared/data/cifar10-jpeg75.tar.xz
    papm group --base checkpoints/base.pt --devices 2-10
    papm prune --base checkpoints/base.pt --classes 3 5 --params-reduction 0.77 --epochs 20
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .util import PapmError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise PapmError(f"{message} (see '{self.prog} --help')")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the base model centrally",
                       description="Train the base ResNet18; keeps the best checkpoint by "
                                   "validation accuracy and reports test accuracy once.")
    p.add_argument("--preset", default="auto",
                   help="auto (full with CUDA, else quick), smoke, quick, full or a .toml file")
    p.add_argument("--data", help="image tree folder/archive or CIFAR-10 folder (default $PAPM_DATA, "
                                  "else torchvision's download)")
    for name, typ, hlp in [("--epochs", int, "training epochs"), ("--batch-size", int, "batch size"),
                           ("--lr", float, "peak learning rate (one-cycle)"),
                           ("--width", float, "ResNet18 width multiplier (1.0 = 11.17M params)"),
                           ("--seed", int, "random seed (data split, init, order, augmentation)"),
                           ("--weight-decay", float, None), ("--label-smoothing", float, None),
                           ("--val-size", int, "validation images carved from train"),
                           ("--per-class", int, "keep only N train images per class")]:
        p.add_argument(name, type=typ, help=hlp)
    p.add_argument("--classes", type=int, nargs="+", help="train on these class ids only")
    p.add_argument("--device", help="auto, cpu or cuda[:N]")
    p.add_argument("--out", help="checkpoint path (default checkpoints/base.pt)")
    p.add_argument("--no-progress", action="store_true", help="print one line per epoch only")
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="test accuracy, size, latency and throughput of a checkpoint")
    p.add_argument("ckpt", help="a papm checkpoint (.pt)")
    p.add_argument("--data", help="data source (default $PAPM_DATA, else torchvision's download)")
    p.add_argument("--device", default="auto")
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 runs (at least 200)")
    p.add_argument("--batch-size", type=int, default=256, help="batch for the throughput figure")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_eval)


def _add_group(sub) -> None:
    p = sub.add_parser("group", help="group classes into device groups from base-model statistics",
                       description="Covariance-based class grouping for every device count; "
                                   "statistics come from the validation split, never test.")
    p.add_argument("--base", required=True, help="base model checkpoint")
    p.add_argument("--devices", default="2-10", help="a range (2-10) or a list (2,5,10)")
    p.add_argument("--data", help="data source (default $PAPM_DATA, else torchvision's download)")
    p.add_argument("--method", default="correlation",
                   help="correlation (default), covariance or mean-logit-cosine")
    p.add_argument("--max-group-size", type=int, help="rebalance groups larger than this")
    p.add_argument("--out-dir", default="result", help="where deploy_inf.csv, groups.json and PNGs go")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_group)


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="PAPM-prune the base model for a device's classes, then fine-tune",
                       description="Scores channels (alpha*L2 + (1-alpha)*(1-APoZ)), searches the "
                                   "widths that meet the parameter budget exactly, slims the model "
                                   "and fine-tunes it within a data scope.")
    p.add_argument("--base", required=True, help="base model checkpoint")
    p.add_argument("--classes", type=int, nargs="+", required=True, help="the device's class ids")
    p.add_argument("--preset", default="auto", help="auto, smoke, quick, full or a .toml file")
    p.add_argument("--data", help="data source (default $PAPM_DATA, else torchvision's download)")
    for name, typ, hlp in [
            ("--params-reduction", float, "target 1 - P/P0, met within [r, r+0.005] (default 0.77)"),
            ("--target-size-mb", float, "instead: the saved file must be at most this many MB"),
            ("--alpha", float, "weight of the L2 term (0 = APoZ only, 1 = L2 only; default 0.5)"),
            ("--threshold", float, "fixed APoZ threshold (with --search threshold)"),
            ("--min-channels", int, "fewest channels any layer keeps (default 8)"),
            ("--round-to", int, "kept channel counts are multiples of this (default 1)"),
            ("--calib-size", int, "training images of the device's classes for APoZ (default 1024)"),
            ("--epochs", int, "fine-tuning epochs"), ("--batch-size", int, None), ("--lr", float, None),
            ("--ref-size", int, "public reference images carved from train (default 5000)"),
            ("--seed", int, None)]:
        p.add_argument(name, type=typ, help=hlp)
    p.add_argument("--search", choices=["auto", "channel-rank", "threshold"],
                   help="auto: exact budget (default); channel-rank: the original's rule")
    p.add_argument("--auto-search", dest="search", action="store_const", const="auto",
                   help="the default search (kept for the original's command line)")
    p.add_argument("--criterion", choices=["papm", "random"], help="random: a baseline")
    p.add_argument("--scope", choices=["shard", "shard+public", "all"], help="fine-tuning data")
    p.add_argument("--recipe", choices=["papm", "original"], help="original: only with --scope all")
    p.add_argument("--device")
    p.add_argument("--out-dir", help="default checkpoints/")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import checkpoint
    from .config import load_preset
    from .data import load_dataset
    from .specialize import device_data, prune, save_result, test_figures
    from .util import resolve_device

    keys = ("data", "classes", "params_reduction", "target_size_mb", "alpha", "threshold",
            "min_channels", "round_to", "calib_size", "epochs", "batch_size", "lr", "ref_size",
            "seed", "search", "criterion", "scope", "recipe", "device", "out_dir")
    cfg = load_preset(args.preset, "prune", **{k: getattr(args, k) for k in keys})
    dev = resolve_device(cfg.device)
    base, meta = checkpoint.load(args.base, dev)
    ds = load_dataset(cfg.data)
    if meta.get("class_names") != ds.classes:
        raise PapmError(f"base model classes {meta.get('class_names')} differ from the data's {ds.classes}")
    data = device_data(ds, meta, cfg, dev)
    console = Console()
    console.print(f"[bold]papm prune[/] classes {cfg.classes} r={cfg.params_reduction} alpha={cfg.alpha} "
                  f"scope={cfg.scope} recipe={cfg.recipe}: shard {len(data.shard)} images, "
                  f"calib {len(data.calib)}, public ref {len(data.ref)}")
    res = prune(base, data, cfg, on_epoch=lambda h: console.print(
        f"  fine-tune epoch {h['epoch']:3d}  loss {h['loss']:.3f}  val(own) {h['val_acc']:.2f}%"))
    res.report.update(test_figures(res.model, ds.test, cfg.classes))
    path = save_result(res, cfg, ds.classes, cfg.out_dir)
    r = res.report
    table = Table(title="kept / total channels per unit")
    for col in ("unit", "kept", "total", "kept %", "mean APoZ"):
        table.add_column(col, justify="left" if col == "unit" else "right")
    for row in r["layers"]:
        table.add_row(row["unit"], str(row["kept"]), str(row["total"]),
                      f"{100 * row['kept'] / row['total']:.0f}", f"{r['apoz'][row['unit']]['mean']:.3f}")
    console.print(table)
    console.print(f"threshold {r['threshold']:.4f}  reduction {r['reduction']:.4f} (target "
                  f"{cfg.params_reduction})  params {r['params']:,} / {r['base_params']:,}  file "
                  f"{r['file_mb']:.2f} MB  scoring+search+slim {r['prune_seconds']:.1f} s")
    console.print(f"test accuracy: all classes {r['test_acc']:.2f}%, own classes {r['test_own_acc']:.2f}%"
                  f"  (selection: validation, epoch {r['finetune']['best_epoch'] if r['finetune'] else 0})")
    console.print(f"saved {path} and {path.with_suffix('.json')}")
    return 0


def cmd_group(args) -> int:
    from .grouping import parse_devices, run_grouping

    res = run_grouping(args.base, parse_devices(args.devices), args.data, args.method,
                       args.out_dir, args.max_group_size, args.device)
    for n, g in res["groups"].items():
        print(f"Device {n}: {g}")
    print(f"wrote {args.out_dir}/deploy_inf.csv, groups.json, similarity.png, dendrogram.png")
    return 0


def cmd_train(args) -> int:
    from rich.console import Console

    from .config import load_preset
    from .train import train

    cfg = load_preset(args.preset, "train", data=args.data, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, width=args.width, seed=args.seed,
                      weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                      val_size=args.val_size, per_class=args.per_class, classes=args.classes,
                      device=args.device, out=args.out)
    console = Console()
    console.print(f"[bold]papm train[/] width {cfg.width} epochs {cfg.epochs} batch {cfg.batch_size} "
                  f"lr {cfg.lr} seed {cfg.seed} -> {cfg.out}")
    res = train(cfg, show_progress=not args.no_progress, log=console.print)
    console.print(f"best val {res.best_val:.2f}% (epoch {res.best_epoch}), test {res.test_acc:.2f}%, "
                  f"{res.seconds:.0f} s; saved {res.path}")
    return 0


def cmd_eval(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import checkpoint
    from .data import load_dataset
    from .evaluate import accuracy, latency_ms, throughput
    from .models import count_params
    from .util import resolve_device, write_json

    if args.runs < 1 or args.batch_size < 1:
        raise PapmError("--runs and --batch-size must be positive")
    device = resolve_device(args.device)
    model, meta = checkpoint.load(args.ckpt, device)
    ds = load_dataset(args.data)
    served = meta.get("classes") or list(range(len(ds.classes)))
    if [ds.classes[i] for i in served if i < len(ds.classes)] != meta.get("class_names"):
        raise PapmError(f"checkpoint classes {meta.get('class_names')} do not match the data's "
                        f"classes {ds.classes}; evaluate it on the data it was trained for")
    test = ds.test if len(served) == len(ds.classes) else ds.test.shard(served, remap=True)
    acc = accuracy(model, test.to(device))
    lat = latency_ms(model, args.runs, device=device)
    thr = throughput(model, args.batch_size, device=device)
    res = {"ckpt": str(args.ckpt), "kind": meta.get("kind"), "test_acc": acc.overall,
           "test_per_class": acc.per_class, "params": count_params(model),
           "param_mb": checkpoint.param_mb(model), "file_mb": checkpoint.file_mb(args.ckpt),
           "latency": lat, "throughput": thr}
    console = Console()
    table = Table(title=f"{Path(args.ckpt).name}: test accuracy per class ({acc.n} images)")
    table.add_column("class")
    table.add_column("name")
    table.add_column("acc %", justify="right")
    for cid, (name, a) in zip(served, acc.per_class.items()):
        table.add_row(str(cid), name, f"{a:.2f}")
    table.add_row("all", "", f"[bold]{acc.overall:.2f}[/]")
    console.print(table)
    console.print(f"params {res['params']:,}  |  {res['param_mb']:.2f} MB weights, file "
                  f"{res['file_mb']:.2f} MB (MB = 2^20 bytes)")
    console.print(f"batch-1 latency {lat['median_ms']:.2f} ms median (p90 {lat['p90_ms']:.2f}) over "
                  f"{lat['runs']} runs on {lat['device']}, {lat['threads']} threads")
    console.print(f"throughput {thr['images_per_s']:.0f} img/s at batch {thr['batch_size']}")
    if args.json:
        write_json(args.json, res)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="papm", description="PAPM: class-specialist compression of a CNN.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_eval(sub)
    _add_group(sub)
    _add_prune(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except PapmError as e:
        if os.environ.get("PAPM_DEBUG"):
            raise
        print("papm: error: " + " ".join(str(e).split()), file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("papm: interrupted; completed checkpoints are intact, rerun to start again",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
