"""The final table over seeds: fused test accuracy (mean ± sd) per device count beside the
base model, N = 1, the best single device and the plain average, from finished runs.

Every setting is fixed before this runs; it only reads ``n<N>/result.json`` of each run
folder (one folder per seed, e.g. from ``benchmarks/seeds.sh``) and prints markdown.

Example: ``python benchmarks/seed_table.py runs/seeds/seed0 runs/seeds/seed1 runs/seeds/seed2``
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _ms(v: list[float]) -> str:
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def main(folders: list[str]) -> int:
    runs = [{int(p.parent.name[1:]): json.loads(p.read_text()) for p in Path(f).glob("n*/result.json")}
            for f in folders]
    ns = sorted(set.intersection(*(set(r) for r in runs)))
    bad = [(f, n) for f, r in zip(folders, runs) for n in ns if r[n].get("incomplete") or r[n].get("missing")]
    if bad:
        print(f"incomplete runs (excluded from nothing; check them): {bad}", file=sys.stderr)
    base = [r[ns[0]]["base"]["test_acc"] for r in runs]
    print(f"{len(runs)} seeds; base {_ms(base)} % (one base model)\n")
    print("| N | fused test % | base − fused | fused − N=1 | best single device % | fused − best single "
          "| average of devices % | head kept (per seed) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in ns:
        f = [r[n]["fusion"]["test_acc"] for r in runs]
        one = [r[1]["fusion"]["test_acc"] for r in runs] if 1 in ns else None
        single = [r[n]["fleet"]["best_single_test_acc"] for r in runs]
        avg = [r[n]["fleet"]["average_test_acc"] for r in runs]
        gap = [b - x for b, x in zip(base, f)]
        d1 = [x - o for x, o in zip(f, one)] if one and n != 1 else None
        ds = [x - s for x, s in zip(f, single)]
        heads = ", ".join(r[n]["fusion"]["head"] + (f" (z {r[n]['fusion']['gain_z']:.1f})"
                                                    if r[n]["fusion"].get("gain_z") is not None else "")
                          for r in runs)
        print(f"| {n} | {_ms(f)} | {_ms(gap)} | {_ms(d1) if d1 else '—'} | {_ms(single)} | {_ms(ds)} "
              f"| {_ms(avg)} | {heads} |")
    print("\nSpecialisation gain per device (own-class test accuracy minus the base model's on the same "
          "classes), mean over seeds:\n")
    print("| N | device classes | own acc % | base own acc % | gain |")
    print("|---|---|---|---|---|")
    for n in ns:
        for d in runs[0][n]["per_device"]:
            own = [r[n]["per_device"][d["device"]]["test_own_acc"] for r in runs
                   if r[n]["per_device"][d["device"]].get("test_own_acc") is not None]
            per = runs[0][n]["base"]["test_per_class"]
            names = list(per)
            b_own = sum(per[names[c]] for c in d["classes"]) / len(d["classes"])
            if own:
                print(f"| {n} | {'-'.join(map(str, d['classes']))} | {_ms(own)} | {b_own:.2f} "
                      f"| {statistics.mean(own) - b_own:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
