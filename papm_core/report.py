"""The run report of sim.py: ``REPORT.md``, CSVs and PNG plots beside the results, shaped
like the original project's tables (``../shared/reference/original-results.md``). The
live progress line is ``papm_core.view``.

Reads only what the runs wrote: ``config.json``, ``base_eval.json``, ``n<N>/result.json``
and ``n<N>/grouping.json`` in the run folder; rerunnable at any time.

Example: ``python -c "from papm_core.report import write_report; write_report('runs/quick', [2, 3], {})"``
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np

from .config import same_settings
from .plots import figure, heatmap, save
from .util import atomic_write

LATENCY_NOTE = ("Every latency (base, devices, head) is the median of at least 200 batch-1 runs after "
                "a warm-up, timed as five such blocks in a row, of which the quietest block counts; each "
                "device's block medians are in `devices.csv` (`latency reused`: timed by an earlier run of "
                "the same model file, thread count and method on this node).")
ORIGINAL = {2: (90.17, 89.88, 3.0), 3: (89.78, 89.56, 3.3), 4: (89.30, 89.00, 3.5), 5: (89.36, 89.14, 3.4),
            6: (88.77, 88.49, 3.3), 7: (88.27, 88.10, 3.4), 8: (87.60, 87.38, 3.4), 9: (87.24, 86.83, 3.4),
            10: (85.64, 85.63, 3.3)}  # best, mean, ms/sample; base 95.59 %, lossless CIFAR-10


def _csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, lambda p: p.write_text(buf.getvalue()))


def _table(rows: list[dict]) -> str:
    if not rows:
        return "_(none)_\n"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return "—" if v is None else str(v)


def load_results(out: Path, devices: list[int], cfg: dict | None = None) -> dict[int, dict]:
    """The results of ``devices``, plus those of any other device count finished in the
    folder by an earlier invocation with the same settings (``cfg``), so that running
    ``--devices 10`` and then ``--devices 5`` on one folder reports both."""
    res = {}
    for p in sorted(out.glob("n*/result.json")):
        try:
            n = int(p.parent.name[1:])
        except ValueError:
            continue
        if n not in devices and cfg is None:
            continue
        r = json.loads(p.read_text())
        if n in devices or same_settings(r.get("config", {}), cfg):
            res[n] = r
    return dict(sorted(res.items()))


def _head(f: dict) -> str | None:
    """The selected head's kind, with the paired z of the MLP's validation gain over the prior."""
    if "head" not in f:
        return None
    return f["head"] + ("" if f.get("gain_z") is None else f" (z {f['gain_z']:.1f})")


def _diff(a, b):
    return None if a is None or b is None else a - b


def _status(r: dict) -> str:
    return "incomplete" if r.get("incomplete") or r.get("missing") else "complete"


def fusion_rows(res: dict[int, dict]) -> list[dict]:
    """One row per device count: the fused fleet beside the base model, its own N = 1 and its
    best single device (picked on validation), and the plain average of its devices."""
    one = res.get(1, {}).get("fusion", {}).get("test_acc") if _status(res.get(1, {})) == "complete" else None
    rows = []
    for n, r in sorted(res.items()):
        f, lat = r["fusion"], [d.get("latency_ms") for d in r["per_device"] if d.get("latency_ms")]
        fl, orig = r.get("fleet", {}), ORIGINAL.get(n, (None, None, None))
        sd = f.get("seed_sd")
        rows.append({"N": n, "status": _status(r), "fused acc %": f["test_acc"], "head": _head(f),
                     "head seeds mean ± sd %": f"{f['seed_mean']:.2f} ± {sd:.2f}" if sd is not None else None,
                     "base − fused": r["base"]["test_acc"] - f["test_acc"],
                     "fused − N=1": _diff(f["test_acc"], one) if n != 1 else None,
                     "best single device %": fl.get("best_single_test_acc"),
                     "fused − best single": _diff(f["test_acc"], fl.get("best_single_test_acc")),
                     "average of devices %": fl.get("average_test_acc"),
                     "worst, one missing %": f.get("missing_one_worst"),
                     "mean, one missing %": f.get("missing_one_mean"),
                     "inference ms (max device)": max(lat) if lat else None,
                     "head ms": f.get("head_latency_ms"), "head MB": f["head_mb"],
                     "missing devices": ", ".join(f"{m['round']}:{m['node']}" for m in r["missing"]) or "none",
                     "original best %": orig[0], "original mean %": orig[1], "original ms": orig[2]})
    return rows


def base_own_acc(base: dict, classes: list[int]) -> float | None:
    """The base model's test accuracy on ``classes`` (per-class figures weighted by images)."""
    names = list(base["test_per_class"])
    counts = base.get("test_class_counts") or {c: 1 for c in names}
    tot = sum(counts[names[c]] for c in classes)
    return sum(base["test_per_class"][names[c]] * counts[names[c]] for c in classes) / tot if tot else None


def device_rows(res: dict[int, dict], base: dict) -> list[dict]:
    rows = []
    for n, r in sorted(res.items()):
        for d in r["per_device"]:
            b_own = base_own_acc(base, d["classes"]) if d["classes"] else None
            blocks = d.get("latency_blocks_ms")
            rows.append({"N": n, "device": d["device"], "node": d.get("node"),
                         "classes": "-".join(map(str, d["classes"])),
                         "not held": "-".join(map(str, d.get("not_held") or [])) or None,
                         "train images": d.get("images"), "own acc %": d.get("test_own_acc"),
                         "base own acc %": b_own, "specialisation gain": _diff(d.get("test_own_acc"), b_own),
                         "all-class acc %": d.get("test_acc"), "val acc %": d.get("val_acc"),
                         "budget": d.get("budget"), "reduction": d.get("reduction"),
                         "params": d.get("params"), "MB": d.get("file_mb"),
                         "× base size": (d["file_mb"] / base["file_mb"]) if d.get("file_mb") else None,
                         "runtime": d.get("runtime"), "latency ms": d.get("latency_ms"),
                         "latency block medians ms": " ".join(f"{b:.2f}" for b in blocks) if blocks else None,
                         "latency reused": d.get("latency_reused"),
                         "built": "reused" if d.get("reused") else ("new" if d.get("key") else "—"),
                         "masked": d.get("masked")})
    return rows


def holdings_note(res: dict[int, dict]) -> str:
    """Which data the nodes held (``sim.holdings``; a box holds its own)."""
    kinds = sorted({h for r in res.values() for h in r.get("holdings") or ["group"]})
    if kinds == ["group"]:
        return ("Each simulated node held exactly its group's shard (`sim.holdings = group`).\n\n")
    return (f"Node holdings: **{', '.join(kinds)}** (see `papm_core/holdings.py`): each group went to the "
            "node holding most of its images, which trained on the images of its classes that it held "
            "(`train images`; `not held`: the group's classes it had none of).\n\n")


def incomplete_lines(res: dict[int, dict]) -> str:
    """Each device count whose fleet was not whole, with the reasons; sim.py redoes them."""
    lines = [f"- **N = {n}**: " + "; ".join(r.get("incomplete") or [f"{m['round']}:{m['node']}: {m['reason']}"
                                                                    for m in r["missing"]])
             for n, r in sorted(res.items()) if _status(r) != "complete"]
    if not lines:
        return ""
    return ("\n**Incomplete device counts** (a device or class was missing; the next run of the same "
            "command redoes them, and their figures are not a whole fleet's):\n\n" + "\n".join(lines) + "\n")


def round_rows(res: dict[int, dict]) -> list[dict]:
    """Each round's wall time split into node compute (the slowest node's own handler
    time) and everything else: transport, ClientApp start-up, queueing, timeouts."""
    rows = []
    for n, r in sorted(res.items()):
        for name, wall in r.get("rounds", {}).items():
            comp = r.get("node_compute_s", {}).get(name, {})
            slowest = max(comp.values(), default=0.0)
            rows.append({"N": n, "engine": r.get("engine", "simulation"), "round": name, "wall s": wall,
                         "node compute s (slowest)": slowest, "other s": wall - slowest,
                         "nodes answered": len(comp)})
    return rows


def _plots(out: Path, res: dict[int, dict], base: dict) -> list[str]:
    ns = sorted(res)
    if not ns:
        return []
    fig, ax = figure()
    ax.plot(ns, [res[n]["fusion"]["test_acc"] for n in ns], "o-", label="fused (val-selected head)")
    worst = [res[n]["fusion"].get("missing_one_worst") for n in ns]
    ax.plot([n for n, w in zip(ns, worst) if w is not None], [w for w in worst if w is not None], "s--",
            label="worst, one device missing")
    single = [(n, res[n].get("fleet", {}).get("best_single_test_acc")) for n in ns]
    ax.plot([n for n, a in single if a is not None], [a for _, a in single if a is not None], "^:",
            label="best single device (picked on validation)")
    ax.axhline(base["test_acc"], color="k", lw=1, label=f"base {base['test_acc']:.2f}%")
    ax.set_xlabel("devices N")
    ax.set_ylabel("test accuracy %")
    ax.legend()
    save(fig, out / "accuracy_vs_n.png")
    fig, (a1, a2) = figure(ncols=2)
    for n in ns:
        devs = [d for d in res[n]["per_device"] if d.get("file_mb")]
        a1.scatter([n] * len(devs), [d["file_mb"] for d in devs], c="C0", s=12)
        a2.scatter([n] * len(devs), [d["latency_ms"] for d in devs], c="C1", s=12)
    a1.axhline(base["file_mb"], color="k", lw=1, label="base")
    a2.axhline(base["latency_ms"], color="k", lw=1, label="base")
    a1.set(xlabel="devices N", ylabel="device model MB", yscale="log")
    a2.set(xlabel="devices N", ylabel="device batch-1 latency ms")
    a1.legend()
    save(fig, out / "size_latency_vs_n.png")
    names = list(base["test_per_class"])
    g = json.loads((out / f"n{ns[-1]}" / "grouping.json").read_text())
    heatmap(np.asarray(g["similarity"]), names, out / "similarity.png", "class similarity (federated statistics)")
    return ["accuracy_vs_n.png", "size_latency_vs_n.png", "similarity.png"]


def _threads_note(base: dict) -> str:
    t = base.get("threads") if base.get("threads_matched") else None
    return (f" (simulated nodes and the base model both at {t} torch thread{'s' if t != 1 else ''}, "
            "each timed alone)") if t else ""


def shared_machine_note(timings: dict, base: dict) -> str:
    """A caveat naming the device counts (and the base timing) during which other papm runs
    were active on this machine: their load is in those latency and time figures."""
    ns = sorted(int(k) for k, t in timings.items() if k.isdigit() and t.get("other_runs"))
    runs = sorted({r for k, t in timings.items() if k.isdigit() for r in t.get("other_runs", [])}
                  | set(base.get("other_runs", [])))
    if not runs:
        return ""
    parts = ([f"N = {', '.join(map(str, ns))}"] if ns else []) + (["the base model's timing"]
                                                                  if base.get("other_runs") else [])
    return (f"\n**Caveat: not a quiet machine.** Other papm runs ({', '.join(runs)}) were active on "
            f"this machine during {' and '.join(parts)}; those wall times, and latencies timed on this "
            "machine, include their load. Rerun with the machine to itself for clean timings "
            "(`--force` redoes the work).\n")


def write_report(out: str | Path, devices: list[int], extra: dict) -> Path:
    out = Path(out)
    base = json.loads((out / "base_eval.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    res = load_results(out, devices, cfg)
    frows, drows = fusion_rows(res), device_rows(res, base)
    brow = [{"model": "base ResNet18", "test acc %": base["test_acc"], "latency ms": base["latency_ms"],
             "params": base["params"], "MB": base["file_mb"]}]
    _csv(out / "baseline.csv", brow)
    _csv(out / "fusion.csv", frows)
    _csv(out / "devices.csv", drows)
    plots = _plots(out, res, base)
    keys = {d["key"] for r in res.values() for d in r["per_device"] if d.get("key")}
    pairs = sum(len(r["per_device"]) for r in res.values())
    timing = [{"N": n, "wall s": t["wall_s"], **{f"{k} s": v for k, v in t["rounds"].items()}}
              for n, t in sorted(((int(k), v) for k, v in extra.get("timings", {}).items() if k.isdigit()))]
    md = [f"# PAPM federation report\n\nGenerated {time.strftime('%Y-%m-%d %H:%M:%S')}. All accuracies are "
          f"on the test split ({next(iter(res.values()))['test_images'] if res else '—'} images), read once "
          "after every model and head was fixed. Each split has one job: the base model chose its checkpoint "
          "and the fusion head its epoch and seed on the server's validation split (the head's keep-or-drop "
          "gate on the other half of it), each device chose its epochs on its own held-out images, which also "
          "gave the grouping statistics. Original figures are on lossless CIFAR-10.\n",
          "## Baseline\n", _table(brow),
          "\nPer-class test accuracy (%):\n", _table([{"class": "acc", **base["test_per_class"]}]),
          "\n## Fusion by device count\n",
          "`fused acc` is the head whose epoch and seed were chosen on one half of the validation split; "
          "`head` says what it is: `prior` scores each class by the devices serving it, `prior + MLP` adds "
          "the trained MLP, kept only where its gain over the prior on the other half of the validation "
          f"split (images that chose neither epoch nor seed) reached a paired z ≥ "
          f"{cfg['fuse'].get('min_gain_z', 0)} (z shown). `head seeds mean ± sd` is the spread over "
          f"{cfg['fuse'].get('head_seeds', 1)} head seeds on test (device models fixed), not a choice. "
          "`N = 1` is one device model for every class at the same budget and recipe; `best single device` "
          "is, of this N's devices (each a classifier of every class), the one most accurate on the "
          "validation split, reported on test; `average of devices` averages their probabilities. "
          "`inference ms` is the largest per-device batch-1 latency, measured on each node"
          f"{_threads_note(base)}. {LATENCY_NOTE}\n", shared_machine_note(extra.get("timings", {}), base),
          incomplete_lines(res), "\n", _table(frows), "\n## Per-device pruning effect and model sizes\n",
          "`specialisation gain` is a device's test accuracy on its own classes minus the base model's on "
          "the same classes; `val acc` is its accuracy on the server's validation split (every class), "
          "which picks the best single device. `budget` is what the device was pruned to (a parameter "
          "reduction, a size in MB or a batch-1 latency in ms, in the device's `runtime`, which its "
          "`latency ms` is measured in; the base model's is PyTorch's).\n\n",
          holdings_note(res),
          f"Distinct pruned models built: **{len(keys)}** for {pairs} (N, group) pairs.\n\n", _table(drows),
          "\n## Wall time per device count and round (s)\n", _table(timing),
          "\n## Rounds over the network: node compute and everything else\n",
          "`node compute` is the slowest node's own handler time, measured on the node; `other` is "
          "the rest of the round's wall time (transport, ClientApp start-up, queueing, waiting on a "
          "timeout).\n\n", _table(round_rows(res)),
          "\n## Plots\n", *[f"![{p}]({p})\n" for p in plots],
          "\n## Provenance\n", "```json\n", json.dumps({"config": cfg, **{k: v for k, v in extra.items()
                                                                         if k != "timings"}}, indent=1,
                                                       default=str), "\n```\n"]
    path = out / "REPORT.md"
    atomic_write(path, lambda p: p.write_text("".join(md)))
    return path
