"""Batch-1 CPU latency (median of >= 200 runs) and large-batch throughput of ResNet18.

Uses randomly initialised weights: latency depends only on the widths, so no trained
checkpoint is needed. Pass ``--ckpt`` to time a saved model instead.

Example: ``python benchmarks/latency.py --widths 1.0 0.25 --threads 2``
"""

from __future__ import annotations

import argparse
import json

import torch

from papm_core import checkpoint
from papm_core.evaluate import latency_ms, throughput
from papm_core.models import build_model, count_params, resnet18_spec
from papm_core.util import provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.25])
    ap.add_argument("--ckpt", nargs="*", default=[])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = [(f"resnet18 width {w}", build_model(resnet18_spec(w))) for w in args.widths]
    models += [(p, checkpoint.load(p)[0]) for p in args.ckpt]
    rows = []
    for name, m in models:
        lat = latency_ms(m, args.runs)
        thr = throughput(m, 256)
        rows.append({"model": name, "params": count_params(m), "mb": round(checkpoint.param_mb(m), 2),
                     **lat, "images_per_s_b256": round(thr["images_per_s"], 1)})
        print(f"{name:<28} {count_params(m):>10,} params  batch-1 {lat['median_ms']:7.2f} ms "
              f"(p90 {lat['p90_ms']:.2f})  {thr['images_per_s']:7.0f} img/s @256  "
              f"[{lat['threads']} threads]", flush=True)
    print(json.dumps({"rows": rows, "provenance": provenance()}, indent=1))


if __name__ == "__main__":
    main()
