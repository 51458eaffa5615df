"""The base model and one device count's device models in three runtimes, side by side:
PyTorch (eager, as the report times them), onnxruntime fp32 and onnxruntime int8.

For each model: batch-1 latency in each runtime (``evaluate.quietest_median_ms``, the
report's method) and its ratio to the base model in the same runtime, the fp32 graph's
parity with PyTorch, and int8's top-1 agreement with fp32 and accuracy on the model's own
classes, on the base model's validation split. Then the fused system's validation accuracy
with every device in each runtime (the run's fusion head, unchanged) against PyTorch.
Validation only: this table decides which runtime a device may use.

Reads a finished ``sim.py`` run folder (its store holds the device models) and writes the
ONNX files beside the table under ``--out``.

Example: ``PAPM_DATA=../shared/data/cifar10-jpeg75.tar.xz python benchmarks/runtimes.py runs/quick --devices 5``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from papm_core import checkpoint
from papm_core.embedding import embed
from papm_core.evaluate import latency_ms
from papm_core.export import export_onnx, onnx_latency_ms, run, session
from papm_core.fusion import head_accuracy
from papm_core.loader import normalize
from papm_core.models import count_params
from papm_core.system import system_data
from papm_core.util import atomic_write, provenance

RUNTIMES = ("torch", "onnxruntime", "onnxruntime-int8")


def models_of(run_dir: Path, n: int, base: str | None) -> tuple[list[tuple[str, Path]], Path]:
    """[(name, checkpoint)] for the base and the N devices of a run, and the run's head."""
    head = run_dir / f"n{n}" / "fusion.pt"
    if not head.is_file():
        raise SystemExit(f"{head} is missing: run sim.py with --devices {n} into {run_dir} first")
    result = json.loads((run_dir / f"n{n}" / "result.json").read_text())
    _, meta = checkpoint.read(head)
    devices = [(f"device {d['device']} {d['classes']}", run_dir / "store" / "pruned" / f"{d['key']}.pt")
               for d in meta["devices"]]
    return [("base", Path(base or result["base"]["path"]))] + devices, head


def measure(name: str, ckpt: Path, out: Path, runs: int) -> dict:
    stem = out / ckpt.stem
    fp32 = export_onnx(ckpt, stem.with_suffix(".onnx"), images=512)
    int8 = export_onnx(ckpt, stem.with_suffix(".int8.onnx"), images=512, int8=True)
    model, _ = checkpoint.load(ckpt)
    lat = {"torch": latency_ms(model, runs)["median_ms"],
           "onnxruntime": onnx_latency_ms(fp32["path"], runs)["median_ms"],
           "onnxruntime-int8": onnx_latency_ms(int8["path"], runs)["median_ms"]}
    row = {"model": name, "ckpt": str(ckpt), "params": count_params(model), "latency_ms": lat,
           "mb": {"torch": checkpoint.file_mb(ckpt), "onnxruntime": fp32["mb"], "onnxruntime-int8": int8["mb"]},
           "parity_max_abs_logit_diff": fp32["max_abs_logit_diff"], "int8": int8["int8"],
           "onnx": {"onnxruntime": fp32["path"], "onnxruntime-int8": int8["path"]}}
    print(f"{name}: {', '.join(f'{k} {v:.2f} ms' for k, v in lat.items())}; int8 agreement "
          f"{int8['int8']['top1_agreement']:.2f} %", flush=True)
    return row


@torch.no_grad()
def fused(rows: list[dict], head_path: Path) -> dict:
    """The fused system's validation accuracy (%) with every device in each runtime."""
    head, _ = checkpoint.load(head_path)
    models, metas = zip(*(checkpoint.load(r["ckpt"]) for r in rows))
    _, _, val = system_data(list(metas), None)
    x = normalize(val.x)
    feats = {"torch": [embed(m, val) for m in models]}
    for rt in RUNTIMES[1:]:
        feats[rt] = [run(session(r["onnx"][rt]), x)[1] for r in rows]
    return {rt: head_accuracy(head, torch.as_tensor(np.concatenate(f, 1)), val.y) for rt, f in feats.items()}


def table(rows: list[dict], acc: dict, n: int) -> str:
    base = rows[0]["latency_ms"]
    lines = [f"| model | params | {' | '.join(f'{rt} ms (× base)' for rt in RUNTIMES)} | int8 MB | "
             "int8 top-1 agreement % | own val acc fp32 → int8 % |", "|" + "---|" * (len(RUNTIMES) + 5)]
    for r in rows:
        lat = " | ".join(f"{r['latency_ms'][rt]:.2f} ({r['latency_ms'][rt] / base[rt]:.2f})" for rt in RUNTIMES)
        q = r["int8"]
        lines.append(f"| {r['model']} | {r['params']:,} | {lat} | {r['mb']['onnxruntime-int8']:.2f} | "
                     f"{q['top1_agreement']:.2f} | {q['fp32_own_val_acc']:.2f} → {q['int8_own_val_acc']:.2f} |")
    slow = {rt: max(r["latency_ms"][rt] for r in rows[1:]) / base[rt] for rt in RUNTIMES}
    lines += ["", "Slowest device / base, same runtime: " + ", ".join(f"{rt} {v:.2f}" for rt, v in slow.items()),
              "", f"| N = {n} fused, validation | " + " | ".join(RUNTIMES) + " |", "|---|" + "---|" * len(RUNTIMES),
              "| accuracy % | " + " | ".join(f"{acc[rt]:.2f}" for rt in RUNTIMES) + " |",
              "| change against torch | " + " | ".join(f"{acc[rt] - acc['torch']:+.2f}" for rt in RUNTIMES) + " |"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished sim.py run folder")
    ap.add_argument("--devices", type=int, default=5, help="the device count N whose models are measured")
    ap.add_argument("--base", help="the base checkpoint (default: the one the run recorded)")
    ap.add_argument("--runs", type=int, default=200, help="timed batch-1 runs per block")
    ap.add_argument("--out", type=Path, help="folder for the ONNX files and runtimes.json (default RUN/runtimes)")
    args = ap.parse_args()
    out = args.out or args.run / "runtimes"
    out.mkdir(parents=True, exist_ok=True)
    models, head = models_of(args.run, args.devices, args.base)
    rows = [measure(name, ckpt, out, args.runs) for name, ckpt in models]
    acc = fused(rows[1:], head)
    text = table(rows, acc, args.devices)
    print(f"\n{text}\n\n{torch.get_num_threads()} threads; {provenance()['platform']}")
    atomic_write(out / "runtimes.json", lambda p: p.write_text(json.dumps(
        {"devices": args.devices, "rows": rows, "fused_val_acc": acc, "threads": torch.get_num_threads(),
         "provenance": provenance()}, indent=1)))


if __name__ == "__main__":
    main()
