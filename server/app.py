"""The PAPM ServerApp: loads (or trains) the base model, runs the PAPM strategy for one
device count N, and writes ``<out>/n<N>/result.json`` atomically. Thin over papm_core.

Run config: ``clients.runconfig.RunConfig`` (the keys of ``[tool.flwr.app.config]`` in
pyproject.toml, typed; sim.py sets every key), read once in ``main``.

Progress goes to ``<out>/progress.json`` (what sim.py displays). Run by ``flwr run .``
itself (no ``config`` from sim.py), it also claims the folder (``config.json``; a folder
holding a run with other settings is refused) and writes the folder's report (REPORT.md,
CSVs, plots: the same ``write_report`` as sim.py) after each device count; an empty ``out``
is ``~/papm-runs/<preset>``.

Example: ``flwr run . --run-config 'devices=2 preset="smoke"' --federation-config "num-supernodes=2"``
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.runconfig import RunConfig
from papm_core import checkpoint, holdings
from papm_core.config import claim_folder, from_dict, load_all, preset_label, to_dict
from papm_core.data import load_dataset
from papm_core.evaluate import LATENCY_METHOD, accuracy, latency_ms
from papm_core.federation import server_data
from papm_core.grouping import ClassStats, group_classes, similarity
from papm_core.models import count_params
from papm_core.neighbours import other_runs
from papm_core.specialize import base_split, planned_split
from papm_core.train import train
from papm_core.util import PapmError, file_sha256, provenance, torch_threads, write_json
from strategies.papm import PapmStrategy, test_split

app = ServerApp()


def resolved_config(run: RunConfig) -> dict:
    """Every stage's settings: the file sim.py wrote, else the named preset's defaults."""
    if run.config:
        raw = json.loads(Path(run.config).read_text())
    else:
        raw = {k: to_dict(v) for k, v in load_all(run.preset).items()}
    raw["prune"] = {**raw["prune"], "classes": [0]}  # placeholder: the grouping assigns classes
    return {stage: from_dict(stage, raw[stage]) for stage in ("train", "prune", "fuse", "sim")}


def run_folder(run: RunConfig) -> Path:
    """The run config's ``out``; empty (a plain ``flwr run .``): ``~/papm-runs/<preset>``."""
    return Path(run.out) if run.out else Path.home() / "papm-runs" / preset_label(run.preset)


def flower_report(out: Path, n: int, result: dict) -> Path:
    """For a plain ``flwr run .`` (sim.py writes its own at the end): this N's time into
    ``timings.json``, then the folder's report, as sim.py writes it, over every device count
    the folder holds (earlier ``flwr run`` calls with other ``devices`` included)."""
    from papm_core.report import write_report  # matplotlib: only where a report is written

    path = out / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[str(n)] = {"wall_s": result["seconds"], "rounds": result["rounds"], "other_runs": []}
    write_json(path, timings)
    ns = sorted(int(d.name[1:]) for d in out.glob("n*") if d.name[1:].isdigit() and (d / "result.json").is_file())
    return write_report(out, ns, {"provenance": result["provenance"], "timings": timings})


def ensure_base(run: RunConfig, cfg: dict, out: Path, say, ds) -> Path:
    """The run config's base model, or one trained per the preset on ``ds`` (the Dataset;
    kept across reruns only when its training completed on this data: a half-trained base,
    or one trained on other data, is trained again). The splits are checked before training."""
    if run.base:
        return Path(run.base)
    path = out / "base.pt"
    if path.is_file():
        _, meta = checkpoint.read(path)
        if meta["metrics"].get("complete") and meta["metrics"].get("data_key") == ds.key:
            return path
    tcfg = cfg["train"]
    planned_split(ds, tcfg, cfg["prune"].ref_size, cfg["prune"].node_val)  # fails now, not after training
    tcfg.out, tcfg.data = str(path), run.data or None
    say(stage="train base", detail=f"width {tcfg.width}, {tcfg.epochs} epochs")
    train(tcfg, show_progress=False, log=lambda line: say(stage="train base", detail=line.strip()))
    return path


def base_figures(base, base_path: Path, test, out: Path, runs: int, threads: int = 0, key: dict | None = None) -> dict:
    """Test accuracy, per class, batch-1 latency, size: measured once per base (by sha256).
    ``threads`` > 0 times the base with the simulated devices' torch threads, so that the
    base and device latencies compare like with like. A figure timed while other papm runs
    were active here is timed again once the machine is quiet. ``key``: what else the
    figures depend on (the data's fingerprint, the test subset)."""
    sha = file_sha256(base_path)
    others = other_runs(str(out))
    matched, threads = threads > 0, threads if threads > 0 else torch.get_num_threads()
    path = out / "base_eval.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if (old.get("sha256"), old.get("test_images"), old.get("threads"), old.get("threads_matched"),
                old.get("latency_method"), old.get("key")) == (sha, len(test), threads, matched, LATENCY_METHOD,
                                                               key or {}) and (others or not old.get("other_runs")):
            return old
    acc = accuracy(base, test)
    with torch_threads(threads):
        lat = latency_ms(base, runs)
    fig = {"sha256": sha, "path": str(base_path), "test_acc": acc.overall, "test_per_class": acc.per_class,
           "latency_ms": lat["median_ms"], "latency_blocks_ms": lat["block_medians_ms"],
           "latency_method": LATENCY_METHOD, "threads": threads, "threads_matched": matched,
           "file_mb": checkpoint.file_mb(base_path), "params": count_params(base),
           "test_images": len(test), "other_runs": others, "key": key or {},
           "test_class_counts": {c: int((test.y == k).sum()) for k, c in enumerate(test.classes)}}
    write_json(path, fig)
    return fig


def grouping_key(stats_key: dict, sim) -> dict:
    """What a grouping depends on: the statistics' key and the grouping settings."""
    return {**stats_key, "grouping": sim.grouping, "max_group_size": sim.max_group_size}


def cached_grouping(run_dir: Path, stats_path: Path | None, key: dict, n: int, sim, k: int) -> dict | None:
    """This N's grouping from an interrupted try (only a complete one, made under ``key``
    plus the grouping settings,
    covering all ``k`` classes); else groups from the class statistics an earlier device
    count of this simulation uploaded (``stats_path``, only ever written complete). Merged
    statistics are an exact sum over every node's held-out images, so they depend neither
    on N nor on how classes were dealt to nodes: the stats round then only identifies the
    nodes. Real boxes (``stats_path`` None) upload their statistics for every N: their
    data may change."""
    g_path = run_dir / "grouping.json"
    if g_path.is_file():
        g = json.loads(g_path.read_text())
        if (g.get("complete") and g.get("key") == grouping_key(key, sim)
                and sorted(c for grp in g.get("groups", []) for c in grp) == list(range(k))):
            return g
    if stats_path is not None and stats_path.is_file():
        cache = json.loads(stats_path.read_text())
        if cache.get("key") == key:
            stats = ClassStats.from_dict(cache["stats"])
            return {"groups": group_classes(stats, n, sim.grouping, sim.max_group_size or None),
                    "similarity": similarity(stats, sim.grouping).tolist()}
    return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunConfig.read(context.run_config)
    out, n = run_folder(run), run.devices
    out.mkdir(parents=True, exist_ok=True)
    progress = out / "progress.json"

    def say(**state):
        write_json(progress, {"devices": n, "time": time.time(), **state})

    t0 = time.monotonic()
    cfg = resolved_config(run)
    if run.by_flwr:  # a plain flwr run: holdings and budgets are run-config keys
        cfg["sim"] = dataclasses.replace(cfg["sim"], holdings=run.holdings, deal_seed=run.deal_seed,
                                         budgets=run.budgets, fleet_budget=run.fleet_budget).validate()
    ds_all = load_dataset(run.data or None)
    data_key = ds_all.key
    settings = {**{k: to_dict(v) for k, v in cfg.items()}, "data": {"fingerprint": data_key}}
    if run.by_flwr:  # before any training: a folder of another run is refused at once
        claim_folder(out, settings, fix="set another out in --run-config")
        print(f"papm: N={n}; results and REPORT.md go to {out}", flush=True)
    base_path = ensure_base(run, cfg, out, say, ds_all)
    base, meta = checkpoint.load(base_path)
    trained_on = meta.get("metrics", {}).get("data_key")
    if trained_on and trained_on != data_key:  # its validation split would not be held out here
        raise PapmError(f"base model {base_path} was trained on other data (fingerprint {trained_on[:12]}, "
                        f"this data {data_key[:12]}); pass the data it was trained on, or train a new base")
    split = base_split(meta, cfg["prune"].ref_size, cfg["prune"].node_val)
    ds, ref, val = server_data(run.data or None, split)
    if not 1 <= n <= len(ds.classes):
        raise PapmError(f"device count {n} is outside [1, {len(ds.classes)}]")
    holdings.check(cfg["sim"].holdings, n, len(ds.classes))
    base_fig = base_figures(base, base_path, test_split(ds, cfg["sim"]), out, cfg["sim"].latency_runs,
                            run.client_threads if run.simulated else 0,
                            {"data": ds.key, "test_per_class": cfg["sim"].test_per_class})
    run_dir = out / f"n{n}"
    stats_key = {"base_sha256": base_fig["sha256"], "split": split, "data": ds.key}
    cached = cached_grouping(run_dir, out / "class_stats.json" if run.simulated else None, stats_key, n,
                             cfg["sim"], len(ds.classes))
    strat = PapmStrategy(n, base, base_fig["sha256"], split, ds, ref, val, cfg["prune"], cfg["fuse"],
                         cfg["sim"], run_dir, cfg["prune"].seed,
                         report=lambda **k: say(stage="rounds", **k))
    result = strat.run(grid, {"key": grouping_key(stats_key, cfg["sim"])}, cached)
    if run.simulated and strat.stats is not None:  # complete statistics only: every node, every class
        write_json(out / "class_stats.json", {"key": stats_key, "stats": strat.stats.to_dict()})
    result.update(engine=run.engine, base=base_fig, seconds=time.monotonic() - t0,
                  reference_images=len(ref), validation_images=len(val), test_images=len(strat.test), split=split,
                  config=settings,
                  provenance={**provenance(),
                              "git_commit": run.git_commit or provenance()["git_commit"]})
    write_json(run_dir / "result.json", result)
    if run.by_flwr:
        print(f"papm: report {flower_report(out, n, result)}", flush=True)
    say(stage="done")
