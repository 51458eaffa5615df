"""Shared fixtures: the tests' CIFAR-10 (shared archive or download), small generated image trees, a private cache."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = Path(os.environ.get("PAPM_TEST_ARCHIVE",
                                     ROOT.parent / "shared" / "data" / "cifar10-jpeg75.tar.xz"))
# without that archive: CIFAR-10 from torchvision, downloaded once into the user's papm cache
# (read before the private cache below replaces PAPM_CACHE for the session)
DOWNLOAD_DIR = Path(os.environ.get("PAPM_CACHE", Path.home() / ".cache" / "papm")) / "torchvision"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Every test session decodes into its own cache, so no test depends on an old one."""
    d = tmp_path_factory.mktemp("papm-cache")
    os.environ["PAPM_CACHE"] = str(d)
    os.environ.pop("PAPM_DATA", None)
    # runs of this session see only each other, not a developer's sim.py next to them
    os.environ["PAPM_RUNS_DIR"] = str(tmp_path_factory.mktemp("papm-runs"))
    return d


@pytest.fixture(scope="session")
def shared_archive() -> Path:
    """The tests' CIFAR-10: ``$PAPM_TEST_ARCHIVE`` (any source ``--data`` accepts), else the
    shared archive beside the clone, else torchvision's download (a cifar-10-batches-py folder)."""
    if SHARED_ARCHIVE.exists():
        return SHARED_ARCHIVE
    if "PAPM_TEST_ARCHIVE" in os.environ:
        pytest.fail(f"PAPM_TEST_ARCHIVE={SHARED_ARCHIVE} does not exist")
    from torchvision.datasets import CIFAR10
    try:
        for train in (True, False):
            CIFAR10(str(DOWNLOAD_DIR), train=train, download=True)
    except Exception as e:  # network errors come in many types
        pytest.fail(f"no test data: no archive at {SHARED_ARCHIVE} and CIFAR-10 could not be downloaded "
                    f"({type(e).__name__}); set PAPM_TEST_ARCHIVE to a local copy")
    return DOWNLOAD_DIR / "cifar-10-batches-py"


@pytest.fixture(scope="session")
def cifar(shared_archive):
    from papm_core.data import load_dataset
    return load_dataset(str(shared_archive))


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


def run_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run ``python -m papm_core.cli ARGS`` in a fresh process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "papm_core.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


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


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, shared_archive):
    out = tmp_path_factory.mktemp("sim") / "smoke"
    t0 = time.monotonic()
    r = run_sim("--preset", "smoke", "--data", shared_archive, "--out", out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (out.parent / "sim.stdout").write_text(r.stdout)
    return out, time.monotonic() - t0
