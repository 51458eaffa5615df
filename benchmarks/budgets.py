"""Per-device budgets of finished runs, side by side: what each device was asked for and got.

Reads ``n<N>/result.json`` of each run folder and prints one row per device: the budget it
was pruned to (``sim.budgets``, ``sim.fleet_budget`` or a box's node config), the parameter
reduction and size it reached, the runtime its latency was measured in, that batch-1
latency against the base model's (PyTorch), and its accuracy on the validation split (all
classes). A second table gives each run's fleet on validation (``val_table.py``'s columns),
so fleets of different budgets compare on validation only; no test figure is printed.

Example: ``python benchmarks/budgets.py runs/uniform runs/mixed``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import val_table  # noqa: E402


def _f(v, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def device_table(folders: list[Path]) -> str:
    head = ("| run | N | device | budget | reduction | params | MB | runtime | latency ms | × base ms "
            "| budget met | val acc % (all classes) |\n|" + "---|" * 12)
    lines = [head]
    for folder in folders:
        base = json.loads((folder / "base_eval.json").read_text())
        for p in sorted(folder.glob("n*/result.json"), key=lambda p: int(p.parent.name[1:])):
            r = json.loads(p.read_text())
            for d in r["per_device"]:
                b, ms = d.get("budget") or "", d.get("latency_ms")
                met = "—"
                if b.endswith("ms") and ms is not None:
                    met = "yes" if ms <= float(b[:-2]) else f"no ({ms - float(b[:-2]):+.2f} ms)"
                elif b.endswith("MB") and d.get("file_mb") is not None:
                    met = "yes" if d["file_mb"] <= float(b[:-2]) else "no"
                elif b and d.get("reduction") is not None:
                    met = "yes" if d["reduction"] >= float(b) else "no"
                lines.append(f"| {folder.name} | {r['devices']} | {d['device']} | `{b or '—'}` | "
                             f"{_f(d.get('reduction'), '.3f')} | {_f(d.get('params'), ',')} | "
                             f"{_f(d.get('file_mb'))} | {d.get('runtime') or '—'} | {_f(ms)} | "
                             f"{_f(ms / base['latency_ms'] if ms else None)} | {met} | "
                             f"{_f(d.get('val_acc'))} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    folders = [Path(a) for a in argv]
    if not folders or not all((f / "base_eval.json").is_file() for f in folders):
        print("budgets: error: give finished run folders (each with base_eval.json)", file=sys.stderr)
        return 2
    print(device_table(folders))
    print()
    return val_table.main([str(f) for f in folders])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
