"""Start and stop exactly the Flower processes a run needs: a SuperLink on free loopback
ports, ``flwr run`` per device count, and a cleanup that leaves nothing behind.

Every process started here carries ``PAPM_RUN_TOKEN`` in its environment, and each
long-lived one (SuperLink, SuperNode) leads its own session; Flower's SuperExec, the
simulation process and Ray's daemons inherit both. ``stop`` signals every process with
the token or in one of those sessions (TERM, then KILL after a grace period), so a run
stops what it started and nothing else. Token and sessions are also written to
``<out>/.flwr/token``: a rerun after a SIGKILL of sim.py first stops what the killed run
left behind.

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


def processes_with(token: str, sessions: frozenset[int] = frozenset()) -> dict[int, int]:
    """{pid: session} of processes (other than ours) whose environment carries
    PAPM_RUN_TOKEN=token, or whose session is one of ``sessions`` (Linux /proc)."""
    needle = f"PAPM_RUN_TOKEN={token}".encode()
    found = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if int(d.name) == os.getpid():
                continue
            sid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[3])
            if sid in sessions or needle in (d / "environ").read_bytes().split(b"\0"):
                found[int(d.name)] = sid
        except (OSError, ValueError, IndexError):
            continue  # gone, or not ours to read
    return found


def stop_token(token: str, sessions: frozenset[int] = frozenset(), grace: float = 5.0, quiet: float = 1.0,
               limit: float = 30.0) -> int:
    """TERM every process of the token or of its sessions, KILL those still alive ``grace``
    s after their TERM; returns how many were still alive (0 on success).

    Sessions matter because Ray's helpers rename themselves (setproctitle), which blanks
    their /proc environ, and Flower's SuperExec starts a session of its own: every session
    a token process leads is added as it is seen. The scan repeats (Ray's raylet
    can start helpers while it is stopped) until nothing was seen for ``quiet`` s, or
    ``limit`` s passed.
    """
    first_seen: dict[int, float] = {}
    sessions = set(sessions)
    t0 = last_seen = time.monotonic()
    while True:
        now = time.monotonic()
        found = {p: s for p, s in processes_with(token, frozenset(sessions)).items() if _alive(p)}
        # only sessions one of ours leads: `flwr run` sits in the caller's (shell's) session
        sessions |= {s for p, s in found.items() if p == s}
        if found:
            last_seen = now
        elif now - last_seen >= quiet:
            return 0
        if now - t0 > limit:
            return len(found)
        for pid in found:
            started = first_seen.setdefault(pid, now)
            try:
                if started == now:
                    os.kill(pid, signal.SIGTERM)
                elif now - started > grace:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"  # zombies are already dead
    except OSError:
        return False


def flwr_run(federation: str, run_config: dict, log: Path, env: dict, extra: list[str] = ()) -> subprocess.Popen:
    """``flwr run --stream`` of this app against ``federation``; it ends when the run ends."""
    rc = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    cmd = [_bin("flwr"), "run", str(ROOT), federation, "--run-config", rc, *extra, "--stream"]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT)


class Launcher:
    """The token, the sessions and the environment shared by every process of one run."""

    def __init__(self, out: Path):
        self.home = out / ".flwr"
        self.home.mkdir(parents=True, exist_ok=True)
        self.token_file = self.home / "token"
        if self.token_file.is_file():  # left by a run that was killed
            stop_token(*self._read_token())
        self.token = uuid.uuid4().hex
        self.sessions: set[int] = set()
        self._write_token()
        self.env = {**os.environ, "PAPM_RUN_TOKEN": self.token, "FLWR_HOME": str(self.home),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    # Flower starts its helpers (flower-superexec, flwr-simulation) from PATH
                    "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}

    def _read_token(self) -> tuple[str, frozenset[int]]:
        text = self.token_file.read_text().strip()
        try:
            d = json.loads(text)
            return str(d["token"]), frozenset(int(s) for s in d.get("sessions", []))
        except (ValueError, KeyError, TypeError):
            return text, frozenset()  # the older plain-token file

    def _write_token(self) -> None:
        self.token_file.write_text(json.dumps({"token": self.token, "sessions": sorted(self.sessions)}))

    def spawn(self, cmd: list[str], log: Path) -> subprocess.Popen:
        """A long-lived process in a session of its own, recorded before it can fork."""
        proc = subprocess.Popen(cmd, env=self.env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
        self.sessions.add(proc.pid)
        self._write_token()
        return proc

    def flwr_run(self, federation: str, run_config: dict, log: Path, extra: list[str] = ()) -> subprocess.Popen:
        return flwr_run(federation, run_config, log, self.env, extra)

    def stop(self) -> int:
        """Stop everything this run started; returns how many processes survived (0)."""
        left = stop_token(self.token, frozenset(self.sessions))
        self.sessions.clear()
        self.token_file.unlink(missing_ok=True)
        return left


def wait_port(proc: subprocess.Popen, port: int, what: str, log: Path, timeout: float = 60.0) -> None:
    """Until ``port`` on loopback accepts connections; a one-line error if ``proc`` dies."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise PapmError(f"the {what} exited with code {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise PapmError(f"the {what} did not open port {port} within {timeout:.0f} s; see {log}")


class Federation(Launcher):
    """A private SuperLink with the simulation runtime, and ``flwr run`` against it."""

    def __init__(self, out: Path, log: Path):
        super().__init__(out)
        self.log = log

    def start(self, timeout: float = 60.0) -> None:
        port, control = free_port(), free_port()
        self.address = f"127.0.0.1:{port}"
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "papm-sim"\n\n[superlink.papm-sim]\n'
            f'address = "{self.address}"\ninsecure = true\n')
        cmd = [_bin("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
               "--port", str(port), "--control-api-address", f"127.0.0.1:{control}",
               "--disable-runtime-dependency-installation"]
        wait_port(self.spawn(cmd, self.log), port, "SuperLink", self.log, timeout)

    def run(self, run_config: dict, num_nodes: int, federation: dict, log: Path) -> subprocess.Popen:
        fed = " ".join(f"{k}={json.dumps(v)}" for k, v in {"num-supernodes": num_nodes, **federation}.items())
        return self.flwr_run("papm-sim", run_config, log, ["--federation-config", fed])
