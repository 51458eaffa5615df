"""Validation figures of finished runs, side by side: the table to choose a preset value on.

Reads ``n<N>/result.json`` of each run folder (one folder per candidate setting, same base
model) and prints, per device count, validation figures only — never a test figure:

- ``head (sel. half)``: the fusion head's accuracy on the validation half that picked its
  epoch and seed (biased upward by that pick, alike for every candidate);
- ``gate half``: the prior alone on the other half (images that chose nothing in the head);
- ``average of devices``: the plain average of the device models' probabilities on the whole
  validation split (5,000 images in the quick preset; nothing is chosen on it);
- ``best single``: the most accurate single device on the whole validation split.

The standard error of one accuracy near 82 % is about 0.54 point on 5,000 images and 0.77
on 2,500; a difference below it is no difference.

Example: ``python benchmarks/val_table.py runs/quick runs/ms160``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def rows(folder: Path) -> dict[int, dict]:
    out = {}
    for p in sorted(folder.glob("n*/result.json")):
        try:
            r = json.loads(p.read_text())
            f, fl = r["fusion"], r.get("fleet", {})
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"val_table: error: {p} is not a finished result ({type(e).__name__}: {e})") from None
        out[int(p.parent.name[1:])] = {
            "complete": not r.get("missing") and not r.get("incomplete"), "head": f.get("head"),
            "sel": f.get("val_acc"), "gate_prior": (f.get("gate") or {}).get("prior_acc"),
            "average": fl.get("average_val_acc"), "single": fl.get("best_single_val_acc")}
    return out


def main(folders: list[str]) -> int:
    if not folders:
        print("usage: python benchmarks/val_table.py RUN_FOLDER [RUN_FOLDER ...]", file=sys.stderr)
        return 2
    runs = {f: rows(Path(f)) for f in folders}
    missing = [f for f, r in runs.items() if not r]
    if missing:
        print(f"val_table: error: no n<N>/result.json under {', '.join(missing)}", file=sys.stderr)
        return 2
    print("| N | run | complete | head kept | head (sel. half) % | prior on gate half % "
          "| average of devices % | best single % |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sorted(set().union(*runs.values())):
        for f, r in runs.items():
            if n in r:
                x = r[n]
                print(f"| {n} | {f} | {'yes' if x['complete'] else 'NO'} | {x['head']} | {_fmt(x['sel'])} "
                      f"| {_fmt(x['gate_prior'])} | {_fmt(x['average'])} | {_fmt(x['single'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
