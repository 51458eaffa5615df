"""Where the main job's time goes: a finished (or partly finished) ``sim.py`` run folder
split into base training, Flower start-up, each round's node compute and overhead, and the
ServerApp's own work (data, grouping, base figures, fusion head, report), per device count.

Sources, all written by the run itself: ``timings.json`` (sim.py: wall time of each N,
from ``flwr run`` to its end), ``n<N>/result.json`` (the ServerApp: its own seconds, each
round's wall seconds, each node's handler seconds per round), ``base.json`` (base training
seconds). Definitions, in seconds:

- start-up = N's wall − the ServerApp's seconds: ``flwr run``, the simulation runtime (Ray)
  and the ServerApp's imports, paid once per N;
- a round's compute = its critical path: max(longest node, node seconds summed / slots),
  where slots = concurrent simulated clients (cores / ``sim.client_cpus``); overhead = the
  round's wall − its compute (message transport, actor start, queueing, slots left idle);
- server = the ServerApp's seconds − its rounds − base training (N = 1 trains the base).

Overhead is everything that is not model compute: start-up + round overhead.

Example: ``python benchmarks/time_table.py runs/quick`` (markdown on stdout, JSON last)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def per_n(folder: Path, n: int, wall: float, slots: int) -> dict:
    r = json.loads((folder / f"n{n}" / "result.json").read_text())
    row = {"n": n, "wall": wall, "app": r["seconds"], "startup": wall - r["seconds"], "rounds": {}}
    for name, sec in r["rounds"].items():
        node = list(r.get("node_compute_s", {}).get(name, {}).values())
        compute = max(max(node, default=0.0), sum(node) / slots)
        row["rounds"][name] = {"wall": sec, "compute": compute, "overhead": sec - compute}
    row["server"] = r["seconds"] - sum(x["wall"] for x in row["rounds"].values())
    return row


def table(folder: Path) -> dict:
    timings = json.loads((folder / "timings.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())
    cores = os.cpu_count() or 1
    slots = max(1, int(cores // (cfg["sim"]["client_cpus"] or cores)))
    base = json.loads((folder / "base.json").read_text()) if (folder / "base.json").is_file() else {}
    base_s = base.get("metrics", {}).get("train_seconds", 0.0)
    done = sorted(int(k) for k, v in timings.items() if k.isdigit() and (folder / f"n{k}" / "result.json").is_file())
    rows = [per_n(folder, n, timings[str(n)]["wall_s"], slots) for n in done]
    if rows and rows[0]["n"] == min(done):
        rows[0]["server"] -= base_s  # the first N's ServerApp trained the base
    return {"base_train_s": base_s, "slots": slots, "rows": rows}


def print_table(t: dict) -> None:
    names = list(dict.fromkeys(k for r in t["rows"] for k in r["rounds"]))
    head = ["N", "wall s", "start-up s", *[f"{k} compute / overhead s" for k in names], "server s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    tot = {"wall": 0.0, "startup": 0.0, "compute": 0.0, "overhead": 0.0, "server": 0.0}
    for r in t["rows"]:
        cells = [str(r["n"]), f"{r['wall']:.0f}", f"{r['startup']:.0f}"]
        for k in names:
            x = r["rounds"].get(k)
            cells.append(f"{x['compute']:.0f} / {x['overhead']:.0f}" if x else "—")
            if x:
                tot["compute"] += x["compute"]
                tot["overhead"] += x["overhead"]
        cells.append(f"{r['server']:.0f}")
        tot["wall"] += r["wall"]
        tot["startup"] += r["startup"]
        tot["server"] += r["server"]
        print("| " + " | ".join(cells) + " |")
    over = tot["startup"] + tot["overhead"]
    print(f"\nbase training {t['base_train_s']:.0f} s (inside the first N's wall); device counts "
          f"{tot['wall']:.0f} s in all: node compute {tot['compute']:.0f} s, server {tot['server']:.0f} s, "
          f"start-up {tot['startup']:.0f} s, round overhead {tot['overhead']:.0f} s; overhead "
          f"(start-up + round overhead) {over:.0f} s = {100 * over / max(tot['wall'], 1e-9):.1f} % of the "
          f"wall ({t['slots']} client slots)")
    t["totals"] = {**tot, "overhead_share": over / max(tot["wall"], 1e-9)}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / "timings.json").is_file():
        print("time_table.py: error: give one sim.py run folder (it holds timings.json)", file=sys.stderr)
        return 2
    t = table(Path(args[0]))
    print_table(t)
    print(json.dumps(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
