"""sim.py's live progress line: device count, round, nodes done, the node at work and an
ETA (rich), read from the run's progress files; ``--no-progress`` prints plain lines.
Per device count it shows validation figures only: test figures wait for ``REPORT.md``.

Example: ``python sim.py --preset smoke`` (the line at the bottom of the terminal)
"""

from __future__ import annotations

import json
from pathlib import Path


class View:
    """One live line for the whole run: device count, round, node and ETA (rich)."""

    WEIGHT = {"stats": 1, "embed": 1, "fuse": 0, "evaluate": 1}

    def __init__(self, devices: list[int], cfg: dict, enabled: bool = True):
        self.devices, self.enabled = devices, enabled
        self.total = sum(n + 3 for n in devices)
        self.done_units, self.last = 0.0, ""

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            self.prog = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn())
            self.prog.__enter__()
            self.task = self.prog.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.prog.__exit__(*exc)
        return False

    def update(self, n: int, out: Path, state: dict | None = None) -> None:
        """Show the run's progress file (or ``state``, e.g. base training before any N)."""
        try:
            st = state if state is not None else json.loads((out / "progress.json").read_text())
        except (OSError, ValueError):
            st = {"stage": "starting Flower"}
        rnd, done, tot = st.get("round", ""), st.get("done", 0), max(1, st.get("total", 1))
        within = {"stats": done / tot, "prune": 1 + n * done / tot, "embed": 1 + n + done / tot,
                  "fuse": 2 + n, "evaluate": 2 + n + done / tot}.get(rnd, 0.0)
        text = (f"N={n} · " if n else "") + st.get("stage", "") + (f" · {rnd} {done}/{tot}" if rnd else "")
        if st.get("detail"):
            text += f" · {st['detail'][:60]}"
        node = _latest_node(out / "store")
        if rnd == "prune" and node:
            text += f" · {node}"
        if self.enabled:
            self.prog.update(self.task, completed=self.done_units + within, description=text)
        elif text != self.last:
            print(text, flush=True)
        self.last = text

    def note(self, line: str) -> None:
        """A line above the live one (a plain print without it)."""
        if self.enabled:
            self.prog.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

    def finished(self, n: int, res: dict) -> None:
        """One line per device count, on validation only: test figures wait for REPORT.md, so
        that nobody compares settings by watching them go past."""
        self.done_units += n + 3
        if self.enabled:
            self.prog.update(self.task, completed=self.done_units)
        self.note(f"N={n}: fused head {res['fusion']['val_acc']:.2f}% on its selection half of validation, "
                  f"{res['seconds']:.0f} s, missing: {len(res['missing'])}")


def _latest_node(store: Path) -> str:
    """The node most recently at work, from the progress files of the simulated nodes'
    store (``store/progress``) or of each box's store (``store/<box>/progress``)."""
    best, text = 0.0, ""
    for p in [*store.glob("progress/*.json"), *store.glob("*/progress/*.json")]:
        try:
            s = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if s.get("stage") == "prune" and s.get("time", 0) > best:
            best, text = s["time"], f"{s['node']} classes {s.get('classes')} epoch {s.get('epoch')}/{s.get('epochs')}"
    return text
