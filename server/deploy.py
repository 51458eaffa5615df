"""A Flower Deployment Engine federation: one SuperLink and one SuperNode per edge box,
as separate processes (on this machine for ``sim.py --deployment``; on real boxes the
same commands run by hand, see ``deploy/``).

Security is on unless ``insecure`` is asked for by name: TLS between SuperNodes and the
SuperLink (certificates from ``server.creds``), and SuperNode authentication, so only the
boxes whose public keys were registered (``flwr supernode register``) may join.

Each SuperNode's ``--node-config`` carries that box's identity and data:
``name="box-0" data="/path/box-0.npz" store="/path/store"``; the ClientApp reads it there.

Example: ``python sim.py --deployment --preset smoke --devices 2``
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from papm_core.util import PapmError
from server.creds import make_node_key, make_tls
from server.launch import Launcher, _bin, flwr_run, free_port, wait_port

FEDERATION = "papm-deploy"


@dataclass
class Box:
    """One edge box: its name (also its key's name), data file and node-local store."""
    name: str
    data: Path
    store: Path
    extra: str = ""  # more node config, e.g. test-only keys


class Deployment(Launcher):
    """SuperLink + SuperNodes on loopback; ``run`` submits the app with ``flwr run``."""

    def __init__(self, out: Path, creds: Path, insecure: bool = False):
        super().__init__(out)
        self.creds, self.insecure = creds, insecure
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.nodes: dict[str, subprocess.Popen] = {}

    def _flwr(self, *args: str) -> dict:
        res = subprocess.run([_bin("flwr"), *args, FEDERATION, "--format", "json"], env=self.env,
                             capture_output=True, text=True, timeout=60)
        try:
            return json.loads(res.stdout)
        except ValueError:
            raise PapmError(f"'flwr {' '.join(args)}' failed: {(res.stderr or res.stdout).strip()[-200:]}")

    def start_superlink(self, timeout: float = 60.0) -> None:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        conn = f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\naddress = "{self.address}"\n'
        cmd = [_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
               "--disable-runtime-dependency-installation"]
        if self.insecure:
            cmd.insert(1, "--insecure")
            conn += "insecure = true\n"
        else:
            tls = make_tls(self.creds, ["127.0.0.1", "localhost"])
            cmd[1:1] = ["--ssl-ca-certfile", str(tls["ca.crt"]), "--ssl-certfile", str(tls["server.pem"]),
                        "--ssl-keyfile", str(tls["server.key"]), "--enable-supernode-auth"]
            conn += f'root-certificates = "{tls["ca.crt"]}"\n'
        (self.home / "config.toml").write_text(conn)
        log = self.logs / "superlink.log"
        self.superlink = self.spawn(cmd, log)
        wait_port(self.superlink, port, "SuperLink", log, timeout)

    def register(self, name: str) -> str:
        """Register box ``name``'s public key (made if missing); returns its node id."""
        _, pub = make_node_key(self.creds, name)
        res = self._flwr("supernode", "register", str(pub))
        if not res.get("success"):
            raise PapmError(f"could not register {name}: {res.get('error-message', res)}")
        return str(res["node-id"])

    def node_cmd(self, box: Box, key: Path | None = None, tls: bool | None = None) -> list[str]:
        """The ``flower-supernode`` command for one box (``key``/``tls`` override for tests)."""
        cfg = f'name="{box.name}" data="{box.data}" store="{box.store}" {box.extra}'.strip()
        cmd = [_bin("flower-supernode"), "--superlink", self.address, "--port", str(free_port()),
               "--node-config", cfg, "--max-retries", "20", "--max-wait-time", "60"]
        if tls is False or (tls is None and self.insecure):
            return cmd[:1] + ["--insecure"] + cmd[1:]
        key = key or make_node_key(self.creds, box.name)[0]
        return cmd + ["--root-certificates", str(self.creds / "ca.crt"), "--auth-supernode-private-key", str(key)]

    def start_node(self, box: Box, cmd: list[str] | None = None) -> subprocess.Popen:
        proc = self.spawn(cmd or self.node_cmd(box), self.logs / f"{box.name}.log")
        self.nodes[box.name] = proc
        (self.home / "nodes.json").write_text(json.dumps({k: p.pid for k, p in self.nodes.items()}))
        return proc

    def online(self) -> list[str]:
        """Node ids the SuperLink lists as online."""
        nodes = self._flwr("supernode", "list").get("nodes", [])
        return [str(n["node-id"]) for n in nodes if n.get("status") == "online"]

    def start(self, boxes: list[Box], timeout: float = 120.0) -> None:
        """SuperLink, registration (secure mode), one SuperNode per box; waits until all are online."""
        self.start_superlink()
        if not self.insecure:
            for b in boxes:
                self.register(b.name)
        for b in boxes:
            self.start_node(b)
        t0 = time.monotonic()
        while len(self.online()) < len(boxes):
            dead = [n for n, p in self.nodes.items() if p.poll() is not None]
            if dead or time.monotonic() - t0 > timeout:
                what = f"{dead} exited" if dead else f"not all online within {timeout:.0f} s"
                raise PapmError(f"SuperNodes {what}; see {self.logs}")
            time.sleep(0.5)

    def run(self, run_config: dict, log: Path) -> subprocess.Popen:
        return self.flwr_run(FEDERATION, run_config, log)


def local_boxes(out: Path, base_path: Path, data: str | None, n: int, devices: list[int],
                extra: dict[str, str] | None = None) -> list[Box]:
    """Data files for N local boxes, box i holding group i of the base model's grouping.

    Only for the local multi-process federation: it stands in for the world that put the
    data on the boxes. Each file holds exactly what simulated node i would read (the
    private training images and validation images of its classes, carved by the base
    model's split), so a deployment and a simulation with the same seed match. The
    strategy still computes the grouping from the boxes' own statistics and matches
    groups to boxes by the classes they report.
    """
    from papm_core import checkpoint
    from papm_core.grouping import run_grouping
    from papm_core.nodedata import make_box
    from papm_core.util import file_sha256

    folder = out / "boxes"
    gfile = folder / "groups.json"
    sha = file_sha256(base_path)
    prune_cfg = json.loads((out / "config.json").read_text())["prune"]
    g = json.loads(gfile.read_text()) if gfile.is_file() else {}
    if g.get("base_sha256") != sha or str(n) not in g.get("groups", {}):
        g = run_grouping(str(base_path), sorted(set(devices) | {n}), data, out_dir=str(folder), device="cpu",
                         ref_size=int(prune_cfg["ref_size"]), node_val=float(prune_cfg["node_val"]))
    _, meta = checkpoint.read(base_path)
    boxes = []
    for i, classes in enumerate(g["groups"][str(n)]):
        name = f"box-{i}"
        path = folder / f"n{n}" / f"{name}.npz"
        if not path.is_file():
            make_box(path, meta, data, classes, int(prune_cfg["ref_size"]), float(prune_cfg["node_val"]))
        boxes.append(Box(name, path, out / "store" / name, (extra or {}).get(name, "")))
    return boxes


def attached_run(federation: str, run_config: dict, log: Path) -> subprocess.Popen:
    """``flwr run`` against a federation someone else runs (``deploy/superlink.sh``), named in
    the user's ``$FLWR_HOME/config.toml``; nothing is started or stopped here."""
    return flwr_run(federation, run_config, log, {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
