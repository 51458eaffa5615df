"""Size precision and speed of PAPM's exact-budget search against the original's rule.

For each target r, prints the achieved parameter reduction of our search and of the
original project's channel-rank rule (T = k-th APoZ, k = round(N r)), and the wall time
of scoring (APoZ over the calibration images + weight norms), search and slimming.

Without ``--base`` it uses a full-width ResNet18 (11.17M parameters) whose BatchNorm
statistics were set by one pass over real images: speed and precision depend on the
widths, not on training. Calibration images are real training images of ``--classes``.

Example: ``python benchmarks/prune_precision.py --data ../shared/data/cifar10-jpeg75.tar.xz``
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from papm_core import checkpoint
from papm_core.data import load_dataset, subsample
from papm_core.loader import normalize
from papm_core.models import build_model, resnet18_spec, spec_params
from papm_core.prune import apoz, channel_rank_keep, papm_scores, search_keep, slim, weight_norms
from papm_core.util import provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--base", help="a trained checkpoint (default: full-width ResNet18)")
    ap.add_argument("--classes", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--calib-size", type=int, default=1024)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5, 0.77, 0.9])
    args = ap.parse_args()
    ds = load_dataset(args.data)
    calib = subsample(ds.train.shard(args.classes), -(-args.calib_size // len(args.classes)))
    if args.base:
        model, _ = checkpoint.load(args.base)
    else:
        torch.manual_seed(0)
        model = build_model(resnet18_spec(1.0)).train()
        with torch.no_grad():
            model(normalize(calib.x[:256]))
        model.eval()
    p0 = spec_params(model.spec)
    rows = []
    for r in args.targets:
        t0 = time.perf_counter()
        scores = papm_scores(apoz(model, calib), weight_norms(model), 0.5)
        t1 = time.perf_counter()
        keep, thr = search_keep(model, scores, r)
        t2 = time.perf_counter()
        small = slim(model, keep)
        t3 = time.perf_counter()
        ours = 1 - spec_params(small.spec) / p0
        keep_cr, _ = channel_rank_keep(apoz(model, calib), r)
        cr = 1 - spec_params(slim(model, keep_cr).spec) / p0
        rows.append({"target": r, "papm_reduction": round(ours, 5), "papm_error": round(ours - r, 5),
                     "channel_rank_reduction": round(cr, 5), "channel_rank_error": round(cr - r, 5),
                     "score_s": round(t1 - t0, 2), "search_s": round(t2 - t1, 2),
                     "slim_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2),
                     "params": spec_params(small.spec), "mb": round(checkpoint.param_mb(small), 2)})
        print(f"r={r:<5} PAPM {ours:.4f} (err {ours - r:+.4f})  channel-rank {cr:.4f} (err {cr - r:+.4f})  "
              f"{spec_params(small.spec):>10,} params {checkpoint.param_mb(small):6.2f} MB  "
              f"score {t1 - t0:.2f}s search {t2 - t1:.2f}s slim {t3 - t2:.2f}s", flush=True)
    print(json.dumps({"base_params": p0, "calib": len(calib), "rows": rows,
                      "provenance": provenance()}, indent=1))


if __name__ == "__main__":
    main()
