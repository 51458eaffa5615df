"""Other papm runs on this machine, so that a run can say when its timings shared the CPU.

Wall times and latencies are only honest on an otherwise quiet machine. Within one
simulation the nodes already take turns (``node.machine_lock``), but two ``sim.py`` runs
side by side know nothing of each other: each one's rounds then share the cores (a prune
round's wall time grows with the other run's load; batch-1 medians move less). So every
``sim.py`` holds a *run marker* for its lifetime, a file in a per-user folder of the temp
dir, locked with ``flock``; ``other_runs`` lists the markers that are still locked.
A killed run's lock is released by the kernel (SIGKILL included), so its marker reads as
stale and is removed. ``$PAPM_RUNS_DIR`` moves the folder (tests use their own).

Example: ``python -c "from papm_core.neighbours import other_runs; print(other_runs())"``
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

STALE_AFTER_S = 10.0  # a marker unlocked for this long belongs to a dead run (not one starting)


def runs_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(os.environ.get("PAPM_RUNS_DIR") or Path(tempfile.gettempdir()) / f"papm-runs-{uid}")


@contextlib.contextmanager
def run_marker(label: str):
    """Mark this process as a papm run named ``label`` (its run folder) while the block lasts."""
    try:
        import fcntl
    except ImportError:  # not POSIX: runs cannot see each other; figures carry no caveat
        yield
        return
    folder = runs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}.run"
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(label)
        fh.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(fh, fcntl.LOCK_UN)


def other_runs(own: str | None = None) -> list[str]:
    """Labels of live runs on this machine other than ``own``; stale markers are removed."""
    try:
        import fcntl
    except ImportError:
        return []
    live = []
    for path in sorted(runs_dir().glob("*.run")):
        try:
            with open(path) as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:  # its owner holds it: alive
                    label = path.read_text().strip()
                    if label != own:
                        live.append(label or path.stem)
                    continue
                if time.time() - path.stat().st_mtime > STALE_AFTER_S:
                    path.unlink(missing_ok=True)
                fcntl.flock(fh, fcntl.LOCK_UN)
        except OSError:
            continue  # removed while we looked
    return live


class Watch:
    """Collects the other runs seen while one device count runs (polled at most every ``every_s``)."""

    def __init__(self, own: str, every_s: float = 10.0):
        self.own, self.every_s, self.seen, self._last = own, every_s, set(), -1e9

    def poll(self, force: bool = False) -> None:
        if force or time.monotonic() - self._last >= self.every_s:
            self.seen.update(other_runs(self.own))
            self._last = time.monotonic()
