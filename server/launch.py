"""Start and stop exactly the Flower processes a run needs: a SuperLink on free loopback
ports, ``flwr run`` per device count, and a cleanup that leaves nothing behind.

Every process started here carries ``PAPM_RUN_TOKEN`` in its environment; Flower's
SuperExec, the simulation process and Ray's daemons inherit it. ``stop`` signals every
process with the token (TERM, then KILL after a grace period), so a run stops what it
started and nothing else. The token is also written to ``<out>/.flwr/token``: a rerun
after a SIGKILL of sim.py first stops the processes the killed run left behind.

``FLWR_HOME`` points into the run folder, so the user's ``~/.flwr/config.toml`` cannot
override the federation, and ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` keeps
Flower from building a fresh environment (and downloading another torch) per run.

Example: ``python -c "from server.launch import free_port; print(free_port())"``
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from papm_core.util import PapmError

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (works without an activated venv)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise PapmError(f"'{name}' is not installed; run 'bash scripts/setup.sh' first")
    return found


def processes_with(token: str) -> list[int]:
    """PIDs (other than ours) whose environment carries PAPM_RUN_TOKEN=token (Linux /proc)."""
    needle = f"PAPM_RUN_TOKEN={token}".encode()
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if int(d.name) != os.getpid() and needle in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except (OSError, ValueError):
            continue  # gone, or not ours to read
    return pids


def stop_token(token: str, grace: float = 5.0) -> int:
    """TERM every process of the token, KILL what is left after ``grace`` s; returns count."""
    pids = processes_with(token)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        t0 = time.monotonic()
        while time.monotonic() - t0 < wait:
            pids = [p for p in processes_with(token) if _alive(p)]
            if not pids:
                return 0
            time.sleep(0.2)
    return len(pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"  # zombies are already dead
    except OSError:
        return False


class Federation:
    """A private SuperLink (simulation runtime) and the environment for ``flwr run``."""

    def __init__(self, out: Path, log: Path):
        self.home = out / ".flwr"
        self.home.mkdir(parents=True, exist_ok=True)
        stale = self.home / "token"
        if stale.is_file():
            stop_token(stale.read_text().strip())  # left by a run that was killed
        self.token = uuid.uuid4().hex
        stale.write_text(self.token)
        self.env = {**os.environ, "PAPM_RUN_TOKEN": self.token, "FLWR_HOME": str(self.home),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    # Flower starts its helpers (flower-superexec, flwr-simulation) from PATH
                    "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        port, control = free_port(), free_port()
        self.address = f"127.0.0.1:{port}"
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "papm-sim"\n\n[superlink.papm-sim]\n'
            f'address = "{self.address}"\ninsecure = true\n')
        cmd = [_bin("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
               "--port", str(port), "--control-api-address", f"127.0.0.1:{control}",
               "--disable-runtime-dependency-installation"]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise PapmError(f"the SuperLink exited with code {self.proc.returncode}; see {self.log}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise PapmError(f"the SuperLink did not open port {port} within {timeout:.0f} s; see {self.log}")

    def run(self, run_config: dict, num_nodes: int, federation: dict, log: Path) -> subprocess.Popen:
        """``flwr run --stream`` of this app; the process ends when the run ends."""
        rc = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        fed = " ".join(f"{k}={json.dumps(v)}" for k, v in {"num-supernodes": num_nodes, **federation}.items())
        cmd = [_bin("flwr"), "run", str(ROOT), "papm-sim", "--run-config", rc,
               "--federation-config", fed, "--stream"]
        return subprocess.Popen(cmd, env=self.env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                cwd=ROOT)

    def status(self, run_id: int) -> str:
        """The run's status as Flower reports it (e.g. 'finished:completed')."""
        res = subprocess.run([_bin("flwr"), "ls", "papm-sim", "--run-id", str(run_id),
                              "--format", "json"], env=self.env, capture_output=True, text=True,
                             cwd=ROOT, timeout=60)
        try:
            runs = json.loads(res.stdout)["runs"]
            return str(runs[0].get("status", "unknown"))
        except (ValueError, KeyError, IndexError):
            return "unknown"

    def stop(self) -> int:
        """Stop the SuperLink and everything it started; returns how many survived (0)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        left = stop_token(self.token)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        (self.home / "token").unlink(missing_ok=True)
        return left
