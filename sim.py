"""Simulate the PAPM federation for every device count and compare them in one report.

For each N it runs the Flower App (``server/app.py`` + ``clients/app.py``) on Flower's
simulation runtime (Ray) with ``flwr run`` against a private SuperLink, then writes
``REPORT.md``, CSVs and plots in the run folder. Rerun the same command after an
interrupt (Ctrl-C or SIGKILL) and it carries on: finished device counts are skipped,
the base model and every pruned model are reused from disk, nothing half-written is
read back. ``--force`` redoes the device counts.

With ``--deployment`` each N runs on Flower's Deployment Engine instead: a SuperLink and
N SuperNode processes on this machine (TLS + SuperNode authentication; see
``server/deploy.py``); ``--attach FEDERATION`` runs on edge boxes someone else started
(``deploy/``). Both write the same report.

Examples::

    python sim.py                                  # default preset for this hardware
    python sim.py --deployment --preset smoke --devices 2   # SuperLink + 2 SuperNode processes
    python sim.py --preset smoke --out runs/smoke  # seconds-scale check, N = 2, 3
    python sim.py --devices 2,5,10 --base checkpoints/base.pt --params-reduction 0.77
    python sim.py --set prune.epochs=5 --set fuse.patience=10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from papm_core import holdings  # noqa: E402
from papm_core.config import claim_folder, load_all, preset_label, same_settings, to_dict  # noqa: E402
from papm_core.grouping import parse_devices  # noqa: E402
from papm_core.neighbours import Watch, other_runs, run_marker  # noqa: E402
from papm_core.util import PapmError, git_commit, provenance, write_json  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sim.py", description=__doc__.splitlines()[0])
    ap.add_argument("--devices", help="device counts: a range (2-10) or a list (2,5,10)")
    ap.add_argument("--preset", default="auto", help="auto (full with CUDA, else quick), smoke, quick, "
                                                     "full or a .toml file")
    ap.add_argument("--base", help="base checkpoint from 'papm train' (default: train one)")
    ap.add_argument("--params-reduction", type=float, help="r: pruned away share of parameters")
    ap.add_argument("--alpha", type=float, help="PAPM weight of the normalised L2 norm term")
    ap.add_argument("--data", help="data source (default $PAPM_DATA, else torchvision's download)")
    ap.add_argument("--seed", type=int, help="seed of the whole run")
    ap.add_argument("--out", help="run folder (default runs/<preset>)")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="override any preset key, e.g. prune.epochs=5 (TOML value)")
    ap.add_argument("--deployment", action="store_true",
                    help="Flower's Deployment Engine instead of the simulation runtime: a SuperLink "
                         "and one SuperNode process per device on this machine (TLS + SuperNode auth)")
    ap.add_argument("--insecure-plaintext", action="store_true",
                    help="with --deployment: no TLS and no SuperNode authentication (testing only)")
    ap.add_argument("--attach", metavar="FEDERATION",
                    help="run on an existing federation of edge boxes (a SuperLink connection in "
                         "$FLWR_HOME/config.toml, e.g. papm-deploy from deploy/superlink.sh); needs --base")
    ap.add_argument("--force", action="store_true", help="redo device counts that already finished")
    ap.add_argument("--no-progress", action="store_true", help="plain lines instead of a live display")
    return ap.parse_args(argv)


def overrides(args) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per stage: the keys the flags and ``--set`` override, and where each came from."""
    ov: dict[str, dict] = {"train": {}, "prune": {}, "fuse": {}, "sim": {}}
    origin: dict[str, dict] = {k: {} for k in ov}
    for item in args.set:
        key, sep, value = item.partition("=")
        stage, dot, name = key.partition(".")
        if not sep or not dot or stage not in ov:
            raise PapmError(f"--set {item!r}: use STAGE.KEY=VALUE with STAGE in {sorted(ov)}")
        try:
            ov[stage][name] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            ov[stage][name] = value  # a bare word is a string
        origin[stage][name] = f"--set {stage}.{name}"
    for stage, key, val in (("sim", "devices", args.devices), ("prune", "params_reduction", args.params_reduction),
                            ("prune", "alpha", args.alpha)):
        if val is not None:
            ov[stage][key], origin[stage][key] = val, f"--{key.replace('_', '-')}"
    if args.seed is not None:
        for stage in ("train", "prune"):
            ov[stage]["seed"], origin[stage]["seed"] = args.seed, "--seed"
    return ov, origin


def resolve(args) -> tuple[dict, list[int], Path]:
    """The resolved config of every stage, the device counts and the run folder."""
    cfg = {k: to_dict(v) for k, v in load_all(args.preset, *overrides(args)).items()}
    cfg["prune"].pop("classes")
    cfg["prune"]["device"] = cfg["train"]["device"] = "auto"
    # N = 1 (one device model for every class, same budget and recipe) is the fleet's own
    # reference: every report compares each N with it
    devices = sorted({1, *parse_devices(str(cfg["sim"]["devices"]))})
    from papm_core.data import load_dataset
    ds = load_dataset(args.data)
    n_classes = len(ds.classes)
    bad = [n for n in devices if not 1 <= n <= n_classes]
    if bad:
        raise PapmError(f"device counts {bad} are outside [1, {n_classes}] (the number of classes)")
    for n in devices:  # holdings that cannot cover every class fail now, naming the count
        holdings.check(cfg["sim"]["holdings"], n, n_classes)
    if not args.base:  # a data set too small for the splits fails now, not after base training
        from papm_core.config import TrainConfig
        from papm_core.specialize import planned_split
        planned_split(ds, TrainConfig(**cfg["train"]), cfg["prune"]["ref_size"], cfg["prune"]["node_val"])
    cfg["data"] = {"fingerprint": ds.key}  # a run folder never mixes results of two data sets
    out = Path(args.out or ROOT / "runs" / preset_label(args.preset)).resolve()
    return cfg, devices, out


def run_config(n: int, out: Path, cfg: dict, args, base: str = "") -> dict:
    threads = os.cpu_count() or 1
    client = int(cfg["sim"]["client_cpus"] or threads)
    rc = {"out": str(out), "devices": n, "config": str(out / "config.json"),
          "base": base or (str(Path(args.base).resolve()) if args.base else ""),
          "data": str(Path(args.data).resolve()) if args.data and Path(args.data).exists() else (args.data or ""),
          "store": str(out / "store"), "client-threads": client,
          # fewer nodes than one-client core shares (N = 1 on 2 cores): fine-tuning takes the
          # idle cores too; latencies are still timed at client-threads
          "train-threads": max(client, threads // n),
          "deal-seed": int(cfg["sim"]["deal_seed"]), "holdings": str(cfg["sim"]["holdings"]),
          "git-commit": git_commit(),
          "engine": ("deployment: " + args.attach if args.attach else
                     "deployment, local processes, " + ("plaintext" if args.insecure_plaintext else
                                                        "TLS + SuperNode auth") if args.deployment
                     else "simulation (Ray)")}
    rc.update(test_keys())
    return rc


def follow_hint(n: int, flwr: tuple[str, str], log: Path, start: int) -> str:
    """Once Flower has named this N's run, the line that says how to follow and stop it from
    another terminal; "" while the run has no name yet. ``flwr``: how to call flwr for this
    federation and the SuperLink to name (``("FLWR_HOME=... flwr", "")``); ``start``: the
    log's size before the run (bytes)."""
    if not log.is_file():
        return ""
    with open(log, "rb") as f:
        f.seek(start)
        m = re.search(rb"Successfully started run (\d+)", f.read())
    if not m:
        return ""
    rid, (cmd, sl) = m.group(1).decode(), flwr
    sl = f" {sl}" if sl else ""
    return (f"sim.py: N={n}: Flower run {rid}; follow it with `{cmd} log {rid}{sl} --stream` "
            f"(stop it with `{cmd} stop {rid}{sl}`; `{cmd} list{sl}` lists runs)")


def wait_result(proc, n: int, out: Path, view, log: Path, start: int, flwr: tuple[str, str],
                watch: Watch | None = None) -> dict:
    """Follow one ``flwr run`` to its end; its result.json, or a one-line error.
    ``start`` and ``flwr`` are ``follow_hint``'s; ``watch`` notes other papm runs on this
    machine meanwhile (their load is in the timings)."""
    hinted = ""
    while proc.poll() is None:
        view.update(n, out)
        if not hinted and (hinted := follow_hint(n, flwr, log, start)):
            view.note(hinted)
        if watch:
            watch.poll()
        time.sleep(1.0)
    result = out / f"n{n}" / "result.json"
    if not result.is_file():
        lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
        err = next((ln.split("PapmError: ", 1)[1] for ln in reversed(lines) if "PapmError: " in ln),
                   next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "no log"))
        raise PapmError(f"the run for N={n} failed ({err.strip()[:200]}); see {log}")
    return json.loads(result.read_text())


def start_n(n: int, out: Path) -> tuple[Path, int]:
    """The N's folder's Flower log and its size now (bytes; earlier tries' lines stay above);
    an incomplete result of an earlier try is kept aside, not read back."""
    run_dir = out / f"n{n}"
    run_dir.mkdir(parents=True, exist_ok=True)
    old = run_dir / "result.json"
    if old.is_file():
        old.replace(run_dir / "result.incomplete.json")
    (out / "progress.json").unlink(missing_ok=True)
    log = run_dir / "flower.log"
    return log, log.stat().st_size if log.is_file() else 0


def run_one(fed, n: int, out: Path, cfg: dict, args, view, watch: Watch | None = None) -> dict:
    """One device count on the simulation runtime; returns its result (raises on failure)."""
    log, start = start_n(n, out)
    threads = os.cpu_count() or 1
    cpus = cfg["sim"]["client_cpus"] or threads
    cpus = int(cpus) if float(cpus).is_integer() else float(cpus)
    proc = fed.run(run_config(n, out, cfg, args), n,
                   {"client-resources-num-cpus": cpus, "init-args-num-cpus": threads}, log)
    return wait_result(proc, n, out, view, log, start, (f"FLWR_HOME={fed.home} flwr", ""), watch)


def deployed_base(out: Path, args, view) -> str:
    """The base model for a deployment: --base, else one trained here (boxes need its grouping)."""
    if args.base:
        return str(Path(args.base).resolve())
    from clients.runconfig import RunConfig
    from papm_core.data import load_dataset
    from server.app import ensure_base, resolved_config
    run = RunConfig(config=str(out / "config.json"), data=args.data or "")
    say = lambda **k: view.update(0, out, k)  # noqa: E731
    return str(ensure_base(run, resolved_config(run), out, say, load_dataset(args.data)))


def run_deployed(n: int, devices: list[int], out: Path, cfg: dict, args, view, base: str,
                 watch: Watch | None = None) -> dict:
    """One device count on the Deployment Engine: SuperLink + N SuperNode processes."""
    from server.deploy import Deployment, local_boxes
    log, start = start_n(n, out)
    signals = dict(kv.split("=", 1) for kv in os.environ.get("PAPM_TEST_BOX_SIGNAL", "").split(",") if kv)
    boxes = local_boxes(out, Path(base), args.data, n, devices,
                        {k: f'test-signal="{v}"' for k, v in signals.items()})
    dep = Deployment(out, out / "creds", insecure=args.insecure_plaintext)
    try:
        dep.start(boxes)
        rc = run_config(n, out, cfg, args, base)
        rc["client-threads"] = max(1, (os.cpu_count() or 1) // n)  # the boxes share this machine
        return wait_result(dep.run(rc, log), n, out, view, log, start, (f"FLWR_HOME={dep.home} flwr", ""), watch)
    finally:
        if dep.stop():
            print("sim.py: warning: some Flower processes did not stop", file=sys.stderr)


def finished(result: Path, cfg: dict) -> bool:
    """A device count is done when its result exists, was made with these settings (a
    ``--force`` run with others leaves stale ones) and no device was missing from it; a
    rerun redoes the others, reusing every device model already built (by content key)."""
    try:
        r = json.loads(result.read_text())
    except (OSError, ValueError):
        return False
    return not r.get("missing") and not r.get("incomplete") and same_settings(r.get("config", {}), cfg)


def test_keys() -> dict:
    """Test-only fault injection, passed through from the environment (never in presets)."""
    keys = {}
    if os.environ.get("PAPM_TEST_FAIL_PARTITION"):
        p = os.environ["PAPM_TEST_FAIL_PARTITION"]
        keys["test-fail-partition"] = -2 if p == "all" else int(p)
        keys["test-fail-round"] = os.environ.get("PAPM_TEST_FAIL_ROUND", "prune")
        keys["test-delay-s"] = float(os.environ.get("PAPM_TEST_DELAY_S", 0.0))
    return keys


def _term(signum, frame):
    # SIGTERM cleans up like Ctrl-C: stop what we started; a second SIGTERM (a wrapper such
    # as `timeout` passing its own on) must not cut that cleanup short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_counts(todo: list[int], devices: list[int], out: Path, cfg: dict, args, view, timings: dict) -> None:
    """Every device count still to do, on the engine the flags name; timings.json after each."""
    from server.launch import Federation
    fed = None if args.deployment or args.attach else Federation(out, out / "superlink.log")
    try:
        with view:
            if todo and fed:
                fed.start()
            base = ""
            if todo and args.deployment:
                t = time.monotonic()
                base = deployed_base(out, args, view)
                if not args.base and "base_train_s" not in timings:
                    timings["base_train_s"] = time.monotonic() - t
            for n in todo:
                t, watch = time.monotonic(), Watch(str(out))
                watch.poll(force=True)
                if args.attach:
                    from server.deploy import attached_run
                    log, start = start_n(n, out)
                    res = wait_result(attached_run(args.attach, run_config(n, out, cfg, args), log), n, out, view,
                                      log, start, ("flwr", args.attach), watch)
                elif args.deployment:
                    res = run_deployed(n, devices, out, cfg, args, view, base, watch)
                else:
                    res = run_one(fed, n, out, cfg, args, view, watch)
                watch.poll(force=True)
                timings[str(n)] = {"wall_s": time.monotonic() - t, "rounds": res.get("rounds", {}),
                                   "other_runs": sorted(watch.seen)}
                write_json(out / "timings.json", timings)
                view.finished(n, res)
    finally:
        if fed and fed.stop():
            print("sim.py: warning: some Flower/Ray processes did not stop", file=sys.stderr)


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, _term)
    args = parse_args(argv)
    from papm_core.report import write_report
    from papm_core.view import View

    try:
        if args.attach and not args.base:
            raise PapmError("--attach needs --base: the boxes' data was cut for a known base model")
        if args.attach and args.deployment:
            raise PapmError("--attach and --deployment exclude each other: attach to boxes, or start local ones")
        if args.insecure_plaintext and not args.deployment:
            raise PapmError("--insecure-plaintext only applies to --deployment")
        cfg, devices, out = resolve(args)
        claim_folder(out, cfg, args.force)
        from papm_core.util import precision_line, resolve_device
        dev = resolve_device("auto")
        print(f"sim.py: base training {precision_line(dev, cfg['train']['precision'])}, device fine-tuning "
              f"{precision_line(dev, cfg['prune']['precision'])}; runs to {out}")
        view = View(devices, cfg, enabled=not args.no_progress and sys.stdout.isatty())
        todo = [n for n in devices if args.force or not finished(out / f"n{n}" / "result.json", cfg)]
        t0 = time.monotonic()
        timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
        with run_marker(str(out)):
            others = other_runs(str(out))
            if todo and others:
                print(f"sim.py: warning: other papm runs are active on this machine ({', '.join(others)}); "
                      "their load will be in this run's latency and time figures (REPORT.md notes it)",
                      file=sys.stderr)
            run_counts(todo, devices, out, cfg, args, view, timings)
        report = write_report(out, devices, {"wall_s_this_invocation": time.monotonic() - t0,
                                             "provenance": provenance(), "timings": timings})
        print(f"report: {report}")
        return 0
    except PapmError as e:
        print(f"sim.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sim.py: interrupted; run the same command again to carry on", file=sys.stderr)
        return 130


if __name__ == "__main__":
    if os.environ.get("PAPM_DEBUG"):
        sys.exit(main())
    try:
        sys.exit(main())
    except Exception as e:  # one line for anything unexpected; PAPM_DEBUG=1 shows the traceback
        print(f"sim.py: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        sys.exit(1)
