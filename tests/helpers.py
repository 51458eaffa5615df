"""Test helpers (imported by the tests; fixtures live in conftest.py): generated image trees,
the CLI and sim.py in fresh processes, the Flower processes a run left, and fused accuracy
recomputed from a run's files."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_tree(root: Path, classes=("cat", "dog", "emu"), per_split=(6, 3), modes=None) -> Path:
    """A tiny {train,test}/{class}/ tree of generated images in assorted modes and sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    modes = modes or ["RGB", "L", "P", "RGBA"]
    k = 0
    for split, n in zip(("train", "test"), per_split):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = 32 if i % 3 else 48  # some images need resizing
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                arr[..., ci % 3] = 200 + ci  # a class-dependent channel
                im = Image.fromarray(arr).convert(modes[k % len(modes)])
                ext = "png" if i % 2 else "jpg"
                if ext == "jpg" and im.mode in ("P", "RGBA"):
                    ext = "png"
                im.save(d / f"{i:04d}.{ext}")
                k += 1
    return root


def make_tar(src: Path, dest: Path, mode: str) -> Path:
    with tarfile.open(dest, mode) as tar:
        tar.add(src, arcname="mydata")
    return dest


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    """``papm ARGS`` through its ``main`` in this process: what the console script calls, with
    its exit code, stdout and stderr (a fresh Python would cost about 2 s of imports per call
    on 2 cores; tests about a fresh process start one themselves)."""
    from papm_core.cli import main
    return call_main(main, ["papm", *map(str, args)], env)


def call_main(main, argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """``main(argv[1:])`` in this process as a command line would run it: ``env`` added to the
    environment, stdout/stderr captured, ``sys.exit`` as the exit code; the environment and
    torch's thread count are restored afterwards."""
    import contextlib
    import io

    import torch

    out, err, saved, threads = io.StringIO(), io.StringIO(), dict(os.environ), torch.get_num_threads()
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv[1:])
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


# --- Flower runs: sim.py in a fresh process, and what it leaves behind ------------------------
def run_sim(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """``sim.py --no-progress ARGS`` in a fresh process. Past ``timeout`` (s) it gets SIGTERM,
    as a user's Ctrl-C, so that it stops the Flower processes it started, and the test fails."""
    full = {**os.environ, **(env or {})}
    cmd = [sys.executable, str(ROOT / "sim.py"), "--no-progress", *map(str, args)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full,
                          cwd=ROOT) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            pytest.fail(f"sim.py ran past {timeout} s: {(out + err)[-1500:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _start_ticks(pid) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


_SESSION_START = _start_ticks("self")
_FLOWER_NAMES = (b"ray::", b"raylet", b"gcs_server", b"flower-super", b"flwr-simulation", b"flwr run")


def flower_processes(out: Path, home: Path | None = None) -> list[str]:
    """Live processes sim.py started for ``out`` (its FLWR_HOME, or ``home``, in their
    environment), and any Flower or Ray process started after this test session began: Ray's
    helpers rename themselves (setproctitle), which blanks their environment, so they are
    found by name. Each entry starts with the pid."""
    needle = f"FLWR_HOME={home or out / '.flwr'}".encode()
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
            ours = needle in (d / "environ").read_bytes().split(b"\0")
            late = int(stat[19]) > _SESSION_START and any(n in cmd for n in _FLOWER_NAMES)
            if stat[0] != "Z" and (ours or late):  # the command line makes a failure readable
                found.append(f"{d.name} {stat[0]} {cmd.decode(errors='replace')[:120]}")
        except (OSError, IndexError, ValueError):
            continue
    return found


def fused_from_files(run_dir: Path, stores: list[Path], data, test_per_class: int = 0) -> float:
    """The fused test accuracy recomputed from what a run left on disk: its saved head, and
    the device models it names, read from the nodes' stores and run live on the images."""
    import torch

    from papm_core import checkpoint
    from papm_core.data import load_dataset, subsample
    from papm_core.fusion import fused_logits
    from papm_core.loader import normalize

    head, meta = checkpoint.load(run_dir / "fusion.pt")
    models = []
    for d in meta["devices"]:
        path = next(p for s in stores for p in [s / "pruned" / f"{d['key']}.pt"] if p.is_file())
        models.append(checkpoint.load(path)[0])
    ds = load_dataset(str(data))
    test = subsample(ds.test, test_per_class) if test_per_class else ds.test
    pred = torch.cat([fused_logits(head, models, normalize(test.x[i:i + 500])).argmax(1)
                      for i in range(0, len(test), 500)])
    return 100.0 * (pred == test.y).float().mean().item()
