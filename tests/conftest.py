"""Shared fixtures: the tests' CIFAR-10 (archive or download), a private cache, the smoke run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import ROOT, run_sim

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
    # no data means no test of this suite can say anything: stop the session at once, in one
    # line, rather than erroring every test that needs it
    if "PAPM_TEST_ARCHIVE" in os.environ:
        pytest.exit(f"PAPM_TEST_ARCHIVE={SHARED_ARCHIVE} does not exist", returncode=2)
    from torchvision.datasets import CIFAR10
    try:
        for train in (True, False):
            CIFAR10(str(DOWNLOAD_DIR), train=train, download=True)
    except Exception as e:  # network errors come in many types
        pytest.exit(f"no test data: no archive at {SHARED_ARCHIVE} and CIFAR-10 could not be downloaded "
                    f"({type(e).__name__}); set PAPM_TEST_ARCHIVE to a local copy", returncode=2)
    return DOWNLOAD_DIR / "cifar-10-batches-py"


@pytest.fixture(scope="session")
def cifar(shared_archive):
    from papm_core.data import load_dataset
    return load_dataset(str(shared_archive))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, shared_archive):
    out = tmp_path_factory.mktemp("sim") / "smoke"
    t0 = time.monotonic()
    r = run_sim("--preset", "smoke", "--data", shared_archive, "--out", out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (out.parent / "sim.stdout").write_text(r.stdout)
    return out, time.monotonic() - t0
