"""The ``papm`` command: thin argparse front-ends over the papm_core stages.

Every failure the user can fix prints one line (``papm: error: ...``) and exits 2;
no traceback. Set ``PAPM_DEBUG=1`` to see the traceback anyway.

Examples::

    papm train --width 0.25 --epochs 10 --data ../shared/data/cifar10-jpeg75.tar.xz
    papm eval checkpoints/base.pt --data ../shared/data/cifar10-jpeg75.tar.xz
    papm group --base checkpoints/base.pt --devices 2-10
    papm prune --base checkpoints/base.pt --classes 3 5 --params-reduction 0.77 --epochs 20
    papm fuse --groups result/groups.json --devices 2 --threshold 77
    papm eval --split checkpoints/fusion_n2_th77.pt --base checkpoints/base.pt
    papm shard --base checkpoints/base.pt --data /data/box0-images --out /srv/papm/box-0.npz
    papm export checkpoints/pruned_class3-5_th77.pt --format onnx --out device.onnx
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .util import PapmError


def _console():
    from rich.console import Console

    return Console(soft_wrap=True)  # long summary lines stay whole in logs


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
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="training autocast: auto = bf16 on CUDA and on CPUs with native bf16 "
                        "(AMX, AVX512-BF16), else fp32")
    p.add_argument("--device", help="auto, cpu or cuda[:N]")
    p.add_argument("--out", help="checkpoint path (default checkpoints/base.pt)")
    p.add_argument("--no-progress", action="store_true", help="print one line per epoch only")
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="test accuracy, size, latency and throughput of a checkpoint")
    p.add_argument("ckpt", nargs="?", help="a papm checkpoint (.pt) of a base or device model")
    p.add_argument("--split", metavar="HEAD", help="evaluate the fused system of this fusion head "
                                                   "in split mode (devices + head)")
    p.add_argument("--base", help="with --split: the base model, measured in the same run")
    p.add_argument("--ckpts", nargs="+", help="with --split: device checkpoints (default: as recorded)")
    p.add_argument("--csv", help="with --split: append one CSV row here")
    p.add_argument("--data", help="data source (default $PAPM_DATA, else torchvision's download)")
    p.add_argument("--device", default="auto")
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 runs (at least 200)")
    p.add_argument("--batch-size", type=int, default=256, help="batch for the throughput figure")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_eval)


def _add_group(sub) -> None:
    p = sub.add_parser("group", help="group classes into device groups from base-model statistics",
                       description="Covariance-based class grouping for every device count; "
                                   "statistics come from the devices' held-out images (as in the "
                                   "federation), never the server's validation or test split.")
    p.add_argument("--base", required=True, help="base model checkpoint")
    p.add_argument("--devices", default="2-10", help="a range (2-10) or a list (2,5,10)")
    p.add_argument("--data", help="data source (default $PAPM_DATA, else torchvision's download)")
    p.add_argument("--method", default="correlation",
                   help="correlation (default), covariance or mean-logit-cosine")
    p.add_argument("--max-group-size", type=int, help="rebalance groups larger than this")
    p.add_argument("--ref-size", type=int, default=5000, help="the public reference set size (prune.ref_size)")
    p.add_argument("--node-val", type=float, default=0.1, help="the devices' held-out share (prune.node_val)")
    p.add_argument("--out-dir", default="result", help="where deploy_inf.csv, groups.json and PNGs go")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_group)


def _add_prune(sub) -> None:
    from .config import CRITERIA, RUNTIMES

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
            ("--target-latency-ms", float, "instead: batch-1 latency here, in --runtime, at most this many ms"),
            ("--budget", str, "one of the above in one syntax: 0.77, 1.2MB or 2.5ms"),
            ("--alpha", float, "weight of the L2 term (0 = APoZ only, 1 = L2 only; default 0.5)"),
            ("--threshold", float, "fixed APoZ threshold (with --search threshold)"),
            ("--min-channels", int, "fewest channels any layer keeps (default 8)"),
            ("--round-to", int, "kept channel counts are multiples of this (default 1)"),
            ("--calib-size", int, "training images of the device's classes for APoZ (default 1024)"),
            ("--epochs", int, "fine-tuning epochs"), ("--batch-size", int, None), ("--lr", float, None),
            ("--min-steps", int, "at least this many optimizer steps: more epochs on small shards"),
            ("--ref-size", int, "public reference images carved from train (default 5000)"),
            ("--ce-weight", float, "weight of shard cross-entropy beside distillation (default 1)"),
            ("--seed", int, None)]:
        p.add_argument(name, type=typ, help=hlp)
    p.add_argument("--search", choices=["auto", "channel-rank", "threshold"],
                   help="auto: exact budget (default); channel-rank: the original's rule")
    p.add_argument("--auto-search", dest="search", action="store_const", const="auto",
                   help="the default search (kept for the original's command line)")
    p.add_argument("--criterion", choices=CRITERIA, help="random: a baseline")
    p.add_argument("--scope", choices=["shard", "shard+public", "all"], help="fine-tuning data")
    p.add_argument("--recipe", choices=["papm", "original"], help="original: only with --scope all")
    p.add_argument("--augment", choices=["crop+flip", "flip"],
                   help="flip: teacher logits precomputed per class (faster on CPUs)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="training autocast: auto = bf16 on CUDA and on CPUs with native bf16 "
                        "(AMX, AVX512-BF16), else fp32")
    p.add_argument("--runtime", choices=RUNTIMES,
                   help="what the device runs the model in; a latency budget is met in it (default torch)")
    p.add_argument("--device")
    p.add_argument("--out-dir", help="default checkpoints/")
    p.set_defaults(func=cmd_prune)


def _budget_text(cfg) -> str:
    from . import budget

    b = budget.of(cfg)
    return f"{b} in {cfg.runtime}" if b.kind == "ms" else str(b)


def cmd_prune(args) -> int:
    from rich.table import Table

    from . import checkpoint
    from .config import load_preset
    from .data import cache_dir, load_dataset
    from .specialize import device_data, prune, save_result, test_figures
    from .util import precision_line, resolve_device

    keys = ("data", "classes", "params_reduction", "target_size_mb", "target_latency_ms", "runtime", "alpha",
            "threshold", "min_channels", "round_to", "calib_size", "epochs", "min_steps", "batch_size", "lr",
            "ref_size", "ce_weight", "augment", "seed", "search", "criterion", "scope", "recipe", "device",
            "precision", "out_dir")
    cfg = load_preset(args.preset, "prune", **{k: getattr(args, k) for k in keys})
    if args.budget is not None:
        from . import budget

        cfg = budget.apply(cfg, budget.parse(args.budget, "--budget")).validate()
    dev = resolve_device(cfg.device)
    base, meta = checkpoint.load(args.base, dev)
    ds = load_dataset(cfg.data)
    if meta.get("class_names") != ds.classes:
        raise PapmError(f"base model classes {meta.get('class_names')} differ from the data's {ds.classes}")
    data = device_data(ds, meta, cfg, dev)
    console = _console()
    console.print(f"[bold]papm prune[/] {precision_line(dev, cfg.precision)}; classes {cfg.classes} "
                  f"budget {_budget_text(cfg)} alpha={cfg.alpha} "
                  f"scope={cfg.scope} recipe={cfg.recipe}: shard {len(data.shard)} images, "
                  f"held out {len(data.val)}, calib {len(data.calib)}, public ref {len(data.ref)}")
    res = prune(base, data, cfg, on_epoch=lambda h: console.print(  # selection: the device's own held-out images
        f"  fine-tune epoch {h['epoch']:3d}/{h['epochs']}  loss {h['loss']:.3f}  " + (
            f"held-out loss {h['val_loss']:.4f} (own-class acc {h['val_acc']:.2f}%)" if h["val_loss"] is not None
            else "(not validated: first half)")),
        teacher_cache=cache_dir() / "teacher")
    res.report.update(test_figures(res.model, ds.test, cfg.classes))
    from .specialize import base_split
    from .util import file_sha256
    path = save_result(res, cfg, ds.classes, cfg.out_dir, {
        "path": str(args.base), "sha256": file_sha256(args.base),
        "split": base_split(meta, cfg.ref_size, cfg.node_val)})
    r = res.report
    table = Table(title="kept / total channels per unit")
    for col in ("unit", "kept", "total", "kept %", "mean APoZ"):
        table.add_column(col, justify="left" if col == "unit" else "right")
    for row in r["layers"]:
        table.add_row(row["unit"], str(row["kept"]), str(row["total"]),
                      f"{100 * row['kept'] / row['total']:.0f}", f"{r['apoz'][row['unit']]['mean']:.3f}")
    console.print(table)
    console.print(f"threshold {r['threshold']:.4f}  reduction {r['reduction']:.4f} (budget "
                  f"{_budget_text(cfg)})  params {r['params']:,} / {r['base_params']:,}  file "
                  f"{r['file_mb']:.2f} MB  scoring+search+slim {r['prune_seconds']:.1f} s")
    if "latency_search" in r:
        ls = r["latency_search"]
        console.print(f"latency budget {ls['target_ms']:g} ms in {ls['runtime']}: {ls['achieved_ms']:.2f} ms "
                      f"(± {ls['spread_ms']:.2f}; base {ls['base_ms']:.2f}, smallest {ls['smallest_ms']:.2f}) at "
                      f"reduction {ls['reduction']:.3f}; {len(ls['candidates'])} candidates timed in "
                      f"{ls['seconds']:.0f} s")
    console.print(f"test accuracy: all classes {r['test_acc']:.2f}%, own classes {r['test_own_acc']:.2f}%"
                  f"  (selection: validation, epoch {r['finetune']['best_epoch'] if r['finetune'] else 0})")
    console.print(f"saved {path} and {path.with_suffix('.json')}")
    return 0


def cmd_group(args) -> int:
    from .grouping import parse_devices, run_grouping

    res = run_grouping(args.base, parse_devices(args.devices), args.data, args.method,
                       args.out_dir, args.max_group_size, args.device, args.ref_size, args.node_val)
    for n, g in res["groups"].items():
        print(f"Device {n}: {g}")
    print(f"wrote {args.out_dir}/deploy_inf.csv, groups.json, similarity.png, dendrogram.png")
    return 0


def cmd_train(args) -> int:
    from .config import load_preset
    from .train import train

    cfg = load_preset(args.preset, "train", data=args.data, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, width=args.width, seed=args.seed,
                      weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                      val_size=args.val_size, per_class=args.per_class, classes=args.classes,
                      device=args.device, precision=args.precision, out=args.out)
    from .util import precision_line, resolve_device

    console = _console()
    console.print(f"[bold]papm train[/] {precision_line(resolve_device(cfg.device), cfg.precision)}; width "
                  f"{cfg.width} epochs {cfg.epochs} batch {cfg.batch_size} lr {cfg.lr} seed {cfg.seed} -> {cfg.out}")
    res = train(cfg, show_progress=not args.no_progress, log=console.print)
    console.print(f"best val {res.best_val:.2f}% (epoch {res.best_epoch}), test {res.test_acc:.2f}%, "
                  f"{res.seconds:.0f} s; saved {res.path}")
    return 0


def cmd_eval(args) -> int:
    if args.split:
        return cmd_eval_split(args)
    if not args.ckpt:
        raise PapmError("give a checkpoint to evaluate, or --split HEAD for a fused system")
    if args.ckpt.endswith(".onnx"):
        return cmd_eval_onnx(args)
    from . import checkpoint
    from .data import load_dataset
    from .evaluate import accuracy, latency_ms, throughput
    from .models import count_params
    from .util import resolve_device

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
           "test_images": acc.n, "param_mb": checkpoint.param_mb(model), "file_mb": checkpoint.file_mb(args.ckpt),
           "latency": lat, "throughput": thr}
    _print_eval(args, res, served, f"params {res['params']:,}  |  {res['param_mb']:.2f} MB weights, file "
                                   f"{res['file_mb']:.2f} MB (MB = 2^20 bytes)")
    return 0


def _print_eval(args, res: dict, served: list[int], size_line: str) -> None:
    from rich.table import Table

    from .util import write_json

    lat, thr = res["latency"], res["throughput"]
    console = _console()
    table = Table(title=f"{Path(args.ckpt).name}: test accuracy per class ({res['test_images']} images)")
    table.add_column("class")
    table.add_column("name")
    table.add_column("acc %", justify="right")
    for cid, (name, a) in zip(served, res["test_per_class"].items()):
        table.add_row(str(cid), name, f"{a:.2f}")
    table.add_row("all", "", f"[bold]{res['test_acc']:.2f}[/]")
    console.print(table)
    console.print(size_line)
    console.print(f"batch-1 latency {lat['median_ms']:.2f} ms median (p90 {lat['p90_ms']:.2f}) over "
                  f"{lat['runs']} runs on {lat['device']}, {lat['threads']} threads")
    console.print(f"throughput {thr['images_per_s']:.0f} img/s at batch {thr['batch_size']}")
    if args.json:
        write_json(args.json, res)


def cmd_eval_onnx(args) -> int:
    from .export import evaluate_onnx

    if args.runs < 1 or args.batch_size < 1:
        raise PapmError("--runs and --batch-size must be positive")
    res = evaluate_onnx(args.ckpt, args.data, args.runs, args.batch_size)
    _print_eval(args, res, res["classes"], f"{res['precision']} ONNX file {res['file_mb']:.2f} MB "
                                           "(MB = 2^20 bytes), run by onnxruntime")
    return 0


def _add_fuse(sub) -> None:
    p = sub.add_parser("fuse", help="train the fusion head on device embeddings of the public set",
                       description="Frozen device extractors, a head trained on their embeddings of "
                                   "the public reference set, early stopping on validation.")
    p.add_argument("--ckpts", nargs="+", help="device checkpoints, in device order")
    p.add_argument("--groups", help="groups.json from 'papm group' (instead of --ckpts)")
    p.add_argument("--devices", type=int, help="with --groups: the device count N")
    p.add_argument("--threshold", type=int, default=77, help="with --groups: the th of the names")
    p.add_argument("--ckpt-dir", default="checkpoints")
    p.add_argument("--data")
    # defaults: FuseConfig's (papm_core/config.py), which also checks the values
    p.add_argument("--epochs", type=int, help="head epochs at most (default 200)")
    p.add_argument("--batch-size", type=int, help="default 128")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 5e-4)")
    p.add_argument("--patience", type=int, help="epochs without a better validation accuracy (default 20)")
    p.add_argument("--device-dropout", type=float, help="chance to mask each device (default 0.2)")
    p.add_argument("--prior", choices=("owner", "none"),
                   help="owner: add each class's log-probability from the devices serving it (default)")
    p.add_argument("--min-gain-z", type=float,
                   help="with the prior: keep the trained MLP only if its paired validation gain "
                        "reaches this z (default 1.645, one-sided 5 %%; 0 = any gain)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="default checkpoints/fusion_n<N>_th<T>.pt")
    p.set_defaults(func=cmd_fuse)


def _add_shard(sub) -> None:
    p = sub.add_parser("shard", help="make an edge box's data file for the Deployment Engine",
                       description="Carve a data set (the whole one, or a box's own image tree "
                                   "with class folders named as the base model's classes) by the "
                                   "base model's split and write the box's .npz data file.")
    p.add_argument("--base", required=True, help="the base checkpoint the federation uses")
    p.add_argument("--data", help="image tree or archive (default $PAPM_DATA)")
    p.add_argument("--classes", type=int, nargs="+", help="keep only these class ids (default: all)")
    p.add_argument("--ref-size", type=int, default=5000,
                   help="the server's public reference set size (prune.ref_size of the preset)")
    p.add_argument("--node-val", type=float, default=0.1,
                   help="share of the box's images it holds out for itself (prune.node_val of the preset)")
    p.add_argument("--out", required=True, help="the .npz file for the box's node config 'data'")
    p.set_defaults(func=cmd_shard)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a base or device checkpoint to ONNX, checked against PyTorch",
                       description="Write an ONNX file (fp32, or int8 with --int8; dynamic batch) of a "
                                   "checkpoint; it is written only if its fp32 logits match PyTorch's within "
                                   "1e-3 on real images.")
    p.add_argument("ckpt", help="a checkpoint from papm train or papm prune")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="the edge runtime's format")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--data", help="images for the parity check (default $PAPM_DATA, else download)")
    p.add_argument("--images", type=int, default=512, help="real images the parity check runs on")
    p.add_argument("--int8", action="store_true", help="static int8 quantisation with onnxruntime, calibrated "
                                                       "on training images of the model's own classes")
    p.add_argument("--calib-images", type=int, default=256, help="with --int8: calibration images")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export import export_onnx

    if not args.out.endswith(".onnx"):
        raise PapmError(f"--out {args.out}: an ONNX file must end in .onnx")
    if args.images < 1 or args.calib_images < 1:
        raise PapmError(f"--images and --calib-images must be >= 1, got {args.images} and {args.calib_images}")
    r = export_onnx(args.ckpt, args.out, args.data, args.images, int8=args.int8, calib_images=args.calib_images)
    q = r.get("int8")
    if q:
        print(f"int8, calibrated on {q['calib_images']} training images of its classes; on {q['images']} "
              f"validation images: top-1 agreement with fp32 {q['top1_agreement']:.2f} %, accuracy "
              f"{q['fp32_val_acc']:.2f} -> {q['int8_val_acc']:.2f} % on all classes, "
              f"{q['fp32_own_val_acc']:.2f} -> {q['int8_own_val_acc']:.2f} % on its own ({q['own_images']} images)")
    print(f"wrote {r['path']} ({r['mb']:.2f} MB); fp32 graph against PyTorch on {r['images']} real images: "
          f"max |Δ logit| {r['max_abs_logit_diff']:.1e}, top-1 agreement {r['top1_agreement']:.2f} %")
    return 0


def cmd_shard(args) -> int:
    from . import checkpoint
    from .nodedata import make_box, read_box

    if not args.out.endswith(".npz"):
        raise PapmError(f"--out {args.out}: a box's data file must end in .npz")
    _, meta = checkpoint.read(args.base)
    path = make_box(Path(args.out), meta, args.data, args.classes, args.ref_size, args.node_val)
    box = read_box(str(path))
    held = sorted(set(box.private.y.tolist()))
    print(f"wrote {path}: {len(box.private)} private + {len(box.val)} validation images of classes "
          f"{held} ({', '.join(box.classes[c] for c in held)})")
    return 0


FUSE_FLAGS = ("epochs", "batch_size", "lr", "patience", "device_dropout", "prior", "min_gain_z")


def cmd_fuse(args) -> int:
    from .config import FuseConfig
    from .grouping import read_groups
    from .system import fuse_checkpoints, resolve_ckpts

    if args.ckpts:
        paths = [Path(p) for p in args.ckpts]
    elif args.groups and args.devices:
        groups = read_groups(args.groups)
        if args.devices not in groups:
            raise PapmError(f"{args.groups} has no grouping for {args.devices} devices "
                            f"(has {sorted(groups)})")
        paths = resolve_ckpts(groups[args.devices], args.ckpt_dir, args.threshold)
    else:
        raise PapmError("give --ckpts, or --groups with --devices")
    given = {k: getattr(args, k) for k in FUSE_FLAGS if getattr(args, k) is not None}
    cfg = FuseConfig(**given).validate()  # the defaults and the checks live in FuseConfig alone
    out = args.out or str(Path(args.ckpt_dir) / f"fusion_n{len(paths)}_th{args.threshold}.pt")
    res = fuse_checkpoints(paths, out, args.data, cfg, args.seed)
    kept = "" if res["prior_val"] is None else (
        f"; prior alone {res['prior_val']:.2f}%; head: {res['head']}"
        + ("" if res["gain_z"] is None else f" (gain z {res['gain_z']:.2f} on the gate half)"))
    print(f"fusion head over {len(paths)} devices: best val {res['val_acc']:.2f}% (selection half) at epoch "
          f"{res['best_epoch']} ({res['epochs_run']} run){kept}; saved {res['path']}")
    return 0


def cmd_eval_split(args) -> int:
    import csv
    import io

    from rich.table import Table

    from .system import split_eval
    from .util import atomic_write, write_json

    r = split_eval(args.split, args.base, args.data, args.ckpts, args.runs)
    t = Table(title=f"split mode: {r['devices']} devices + fusion head (batch-1, {r['threads']} threads)")
    for col in ("model", "classes", "params", "MB", "latency ms", "test acc %"):
        t.add_column(col, justify="left" if col in ("model", "classes") else "right")
    if "base" in r:
        b = r["base"]
        t.add_row("base", "all", f"{b['params']:,}", f"{b['mb']:.2f}", f"{b['latency_ms']:.2f}",
                  f"{b['test_acc']:.2f}")
    for i, g in enumerate(r["groups"]):
        t.add_row(f"device {i}", str(g), f"{r['device_params'][i]:,}", f"{r['device_mb'][i]:.2f}",
                  f"{r['device_latency_ms'][i]:.2f}", "")
    t.add_row("fusion head", "", "", f"{r['head_mb']:.2f}", f"{r['head_latency_ms']:.2f}", "")
    t.add_row("[bold]fused system[/]", "all", "", "", f"{r['end_to_end_ms']:.2f}", f"[bold]{r['test_acc']:.2f}[/]")
    _console().print(t)
    if r["missing_one_worst"] is not None:
        print(f"one device missing: worst {r['missing_one_worst']:.2f}%, mean {r['missing_one_mean']:.2f}%")
    if args.json:
        write_json(args.json, r)
    if args.csv:
        keys = ["devices", "test_acc", "missing_one_worst", "missing_one_mean", "end_to_end_ms",
                "head_latency_ms", "head_mb"]
        old = Path(args.csv).read_text() if Path(args.csv).is_file() else ""
        buf = io.StringIO()
        w = csv.writer(buf)
        if not old:
            w.writerow(keys + ["max_device_latency_ms", "max_device_mb", "base_test_acc"])
        w.writerow([r[k] for k in keys] + [max(r["device_latency_ms"]), max(r["device_mb"]),
                                           r.get("base", {}).get("test_acc")])
        atomic_write(args.csv, lambda p: p.write_text(old + buf.getvalue()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="papm", description="PAPM: class-specialist compression of a CNN.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_eval(sub)
    _add_group(sub)
    _add_prune(sub)
    _add_fuse(sub)
    _add_shard(sub)
    _add_export(sub)
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
