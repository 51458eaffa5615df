"""The PAPM server strategy: the federated protocol for one device count N.

Rounds, each with its own timeout (``[sim]`` in the preset):

1. **stats**: send the base model; nodes reply with class statistics of its predictions
   on their own held-out images. The merged statistics give the grouping for N
   (``papm_core.grouping``), the same as ``papm group`` on the same data and base model.
   Statistics that miss a node or a class are used for this run only, never cached.
2. **prune**: node i gets group i (simulation) or the group matching the classes it
   holds (edge boxes); it prunes and fine-tunes locally, selecting its epochs on its own
   held-out images, and keeps the model. It receives the public reference images only.
3. **embed**: nodes embed the public reference and validation images (no labels); the
   server trains the fusion head on them, with device dropout.
4. **evaluate**: nodes embed the test images (no labels), once, after every model and
   head is fixed, and time their model; the server computes the fused figures, with each
   single device missing, and the fleet against its own members.

A node that errors, replies malformed or with bad values (non-finite or negative
statistics, embeddings of another width than before), or misses a timeout is recorded
(round, device, node, reason) and masked from then on; the run goes on with the others.
Late replies are never read: each round pulls only its own message ids.

Example: the ServerApp (``server/app.py``) builds ``PapmStrategy(...).run(grid)``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid

from clients import wire
from papm_core import budget, checkpoint
from papm_core.config import FuseConfig, PruneConfig, SimConfig, to_dict
from papm_core.data import Dataset, Split, subsample
from papm_core.evaluate import head_latency_ms
from papm_core.federation import (
    device_figures,
    fleet_figures,
    fused_figures,
    match_groups,
    save_head,
    stack,
    train_heads,
)
from papm_core.fusion import head_accuracy, head_kind
from papm_core.grouping import ClassStats, group_classes, merge_stats, similarity
from papm_core.node import prune_key
from papm_core.util import PapmError, write_json


def test_split(ds: Dataset, sim: SimConfig) -> Split:
    """The images reported on: the whole test split, or a seeded per-class subset."""
    return subsample(ds.test, sim.test_per_class) if sim.test_per_class else ds.test


@dataclass
class RoundLog:
    name: str
    seconds: float = 0.0
    missing: list[dict] = field(default_factory=list)
    compute: dict[int, float] = field(default_factory=dict)  # device -> node's own handler time (s)


def _reason(text: str) -> str:
    """The node's own error message out of Flower's/Ray's wrapping, on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text or "")
    if "Message:" in text:
        text = text.rsplit("Message:", 1)[1]
    return " ".join(text.split())[:300] or "unknown error"


class PapmStrategy:
    """The PAPM protocol: four rounds (stats, prune, embed, evaluate) and the fusion between
    them, driven by ``run``; not a Flower ``Strategy`` subclass, whose fit/evaluate rounds
    aggregate weights, which PAPM never moves. The ServerApp loads the base model and calls
    ``run``."""

    def __init__(self, n: int, base: torch.nn.Module, base_sha: str, split: dict, ds: Dataset,
                 ref: Split, val: Split, prune_cfg: PruneConfig, fuse_cfg: FuseConfig,
                 sim: SimConfig, out: Path, seed: int, report: Callable[..., None] = lambda **k: None):
        self.n, self.base, self.base_sha, self.split = n, base, base_sha, split
        self.ds, self.ref, self.val = ds, ref, val
        self.test = test_split(ds, sim)
        self.prune_cfg, self.fuse_cfg, self.sim, self.out, self.seed = prune_cfg, fuse_cfg, sim, out, seed
        self.report = report
        self.rounds: list[RoundLog] = []
        self.masked: set[int] = set()  # device indices masked so far
        self.stats: ClassStats | None = None  # merged class statistics, when uploaded this run
        self.incomplete: list[str] = []  # why this run's figures are not a whole fleet's
        self.keys: dict[int, str] = {}   # device -> its model's content key (from the prune round)
        self.dims: dict[int, int] = {}   # device -> embedding width (from the embed round)
        self.nodes: list[int] = []       # device -> Flower node id (fixed by the stats round)
        self.node_names: dict[int, str] = {}
        self.held: dict[int, list[int]] = {}  # device -> the classes its node reported holding
        self.groups: list[list[int]] = []     # device -> its classes
        self.similarity: np.ndarray | None = None
        self.simulated = True            # every node a simulated one (not an edge box)
        self.fixed = False               # some node's data is fixed (box, non-IID holdings)
        self.holdings: list[str] = []    # the holdings the nodes reported
        self.node_setup: dict[int, dict] = {}  # device -> its node's own budget and runtime (boxes)
        self.budgets: dict[int, str] = {}      # device -> the budget it was pruned to, as written

    # --- transport --------------------------------------------------------------------
    def _exchange(self, grid: Grid, name: str, msgs: dict[int, tuple[str, object]], timeout: float,
                  parse: Callable[[int, Message], object]) -> dict[int, object]:
        """Send one message per device, gather valid replies until ``timeout`` seconds."""
        log = RoundLog(name)
        self.rounds.append(log)
        t0 = time.monotonic()
        ids: dict[str, int] = {}
        out: dict[int, object] = {}
        for dev, (mtype, content) in msgs.items():
            m = Message(content, self.nodes[dev], mtype, ttl=timeout)
            ids.update({mid: dev for mid in grid.push_messages([m])})
        pending = dict(ids)
        self.report(round=name, done=0, total=len(msgs))
        while pending and time.monotonic() - t0 < timeout:
            for rep in grid.pull_messages(list(pending)):
                dev = pending.pop(rep.metadata.reply_to_message_id, None)
                if dev is None:
                    continue  # not one of this round's messages: ignore
                if rep.has_error():
                    self._mask(log, dev, f"error: {_reason(rep.error.reason)}")
                    continue
                try:
                    log.compute[dev] = float(wire.config_of(rep.content).get("compute_s", 0.0))
                    out[dev] = parse(dev, rep)
                except (wire.WireError, PapmError, KeyError, ValueError, TypeError) as e:
                    self._mask(log, dev, f"malformed reply: {e}")
                self.report(round=name, done=len(out), total=len(msgs), node=dev)
            if pending:
                time.sleep(0.2)
        for dev in pending.values():
            self._mask(log, dev, f"timeout after {timeout:.0f} s")
        log.seconds = time.monotonic() - t0
        return out

    def _mask(self, log: RoundLog, dev: int, reason: str) -> None:
        self.masked.add(dev)
        log.missing.append({"round": log.name, "device": dev, "node": self.node_names.get(dev, str(self.nodes[dev])),
                            "reason": reason})

    def _live(self) -> list[int]:
        return [d for d in range(len(self.nodes)) if d not in self.masked]

    # --- protocol ---------------------------------------------------------------------
    def wait_for_nodes(self, grid: Grid, timeout: float) -> None:
        t0 = time.monotonic()
        while True:
            ids = sorted(grid.get_node_ids())
            if len(ids) >= self.n:
                break
            if time.monotonic() - t0 > timeout:
                raise PapmError(f"only {len(ids)} of {self.n} nodes connected within {timeout:.0f} s")
            time.sleep(0.5)
        self.nodes = ids[:self.n]

    def _base_msg(self, extra: dict) -> object:
        return wire.pack({"spec": self.base.spec, "split": self.split, **extra}, wire.model_arrays(self.base))

    def stats_round(self, grid: Grid, cached: dict | None) -> list[list[int]]:
        """Identify the nodes (and gather their class statistics unless ``cached`` holds a
        complete grouping); returns the groups, device order fixed by node identity."""
        k = len(self.ds.classes)
        if cached:
            msg = lambda: wire.pack({"split": self.split, "num_classes": k, "identify_only": True})  # noqa: E731
        else:
            msg = lambda: self._base_msg({"num_classes": k})  # noqa: E731
        rep = self._exchange(grid, "stats", {d: ("query.stats", msg()) for d in range(len(self.nodes))},
                             self.sim.stats_timeout, self._parse_stats(cached is not None))
        if not rep:
            reasons = "; ".join(f"{m['node']}: {m['reason']}" for m in self.rounds[-1].missing)
            raise PapmError(f"no node answered the stats round ({reasons[:300]})")
        # device order: by partition (simulation) or name (boxes), so runs are reproducible
        order = sorted(rep, key=lambda d: (rep[d]["ident"]["partition"], rep[d]["ident"]["name"]))
        order += [d for d in range(len(self.nodes)) if d not in rep]
        self.nodes = [self.nodes[d] for d in order]
        self.masked = {order.index(d) for d in self.masked}
        for log in self.rounds:
            for m in log.missing:
                m["device"] = order.index(m["device"])
        rep = {order.index(d): r for d, r in rep.items()}
        self.node_names = {d: r["ident"]["name"] for d, r in rep.items()}
        self.held = {d: r["ident"]["held"] for d, r in rep.items()}
        self.node_setup = {d: {k: str(r["ident"].get(k) or "") for k in ("budget", "runtime")}
                           for d, r in rep.items()}
        # fixed data: an edge box, or a simulated node under non-IID holdings (sim.holdings)
        self.fixed = any(r["ident"].get("holdings", "group") != "group" or not r["ident"]["simulated"]
                         for r in rep.values())
        self.holdings = sorted({str(r["ident"].get("holdings", "group")) for r in rep.values()})
        if cached:
            self.similarity = np.asarray(cached["similarity"])
            groups = [list(g) for g in cached["groups"]]
        else:
            stats = merge_stats([r["stats"] for r in rep.values()])
            uncovered = [c for c in range(k) if stats.count[c] <= 0]
            if uncovered:  # grouped without them for this run; never cached, redone next run
                self.incomplete.append(f"no statistics for classes {uncovered} (stats round: "
                                       f"{len(rep)} of {len(self.nodes)} nodes answered)")
            elif len(rep) == len(self.nodes):
                self.stats = stats  # complete: the only statistics the caller may cache
            self.similarity = similarity(stats, self.sim.grouping)
            groups = group_classes(stats, self.n, self.sim.grouping, self.sim.max_group_size or None)
        self.simulated = all(r["ident"]["simulated"] for r in rep.values())
        held = [self._held_counts(rep.get(d)) for d in range(self.n)] if self.fixed else None
        assign = match_groups(groups, held)
        self.groups = [groups[assign[d]] for d in range(self.n)]
        return groups

    @staticmethod
    def _held_counts(reply: dict | None) -> dict[int, int]:
        """class -> training images a node reported (1 per class where it sent no counts)."""
        if reply is None:
            return {}
        ident = reply["ident"]
        counts = ident.get("held_n") or [1] * len(ident["held"])
        return dict(zip((int(c) for c in ident["held"]), (int(n) for n in counts)))

    def _parse_stats(self, identify_only: bool):
        def parse(dev, rep):
            cfg = wire.config_of(rep.content, ("name", "partition", "held", "simulated"))
            held, held_n = cfg["held"], cfg.get("held_n") or []
            if held_n and (len(held_n) != len(held) or min(held_n) < 0):
                raise wire.WireError(f"held_n {held_n[:10]} does not count the held classes {held[:10]}")
            if identify_only:
                return {"ident": cfg}
            k = len(self.ds.classes)
            arrays = [wire.array(rep.content, "count", "float64", (k,)),
                      wire.array(rep.content, "prob_sum", "float64", (k, k)),
                      wire.array(rep.content, "outer_sum", "float64", (k, k, k)),
                      wire.array(rep.content, "logit_sum", "float64", (k, k))]
            return {"ident": cfg, "stats": ClassStats(*arrays).check()}
        return parse

    def device_prune_cfg(self, d: int) -> PruneConfig:
        """Device ``d``'s prune settings: its group's classes, and its budget: its node's own
        (a box's node config ``budget``), else ``sim.budgets`` cycled in device order, else
        its 1/N share of ``sim.fleet_budget``, else the preset's ``params_reduction`` or
        target; its runtime is its node's own, else the preset's."""
        cfg = replace(self.prune_cfg, classes=self.groups[d])
        own, listed = self.node_setup.get(d, {}), budget.parse_list(self.sim.budgets, "sim.budgets")
        if own.get("budget"):
            b = budget.parse(own["budget"], f"node config budget of {self.node_names.get(d)}")
        elif listed:
            b = listed[d % len(listed)]
        elif self.sim.fleet_budget.strip():
            fleet = budget.parse(self.sim.fleet_budget, "sim.fleet_budget", fleet=True)
            b = budget.Budget("reduction", round(budget.fleet_reduction(fleet, self.n), 4))
        else:
            b = budget.of(cfg)
        cfg = budget.apply(cfg, b)
        if own.get("runtime"):
            cfg = replace(cfg, runtime=own["runtime"])
        self.budgets[d] = str(budget.of(cfg))
        return cfg.validate()

    def prune_round(self, grid: Grid) -> dict[int, dict]:
        # the public reference images (no labels: a device distils on them); nothing of the
        # server's validation or test split goes to a node here
        pub = {"ref_x": self.ref.x.numpy()} if self.prune_cfg.scope != "shard" else {}
        msgs, cfgs = {}, {}
        for d in self._live():
            cfgs[d] = to_dict(self.device_prune_cfg(d))
            content = wire.pack({"spec": self.base.spec, "split": self.split, "prune": cfgs[d],
                                 "base_sha256": self.base_sha}, {**wire.model_arrays(self.base), **pub})
            msgs[d] = ("train.prune", content)

        def parse(dev, rep):
            cfg = wire.config_of(rep.content, ("report", "reused", "data_fingerprint"))
            want = prune_key(self.base_sha, self.groups[dev], cfgs[dev], self.split, str(cfg["data_fingerprint"]))
            if cfg["report"].get("key") != want:
                raise wire.WireError(f"node built model {cfg['report'].get('key')}, expected {want}")
            self.keys[dev] = want
            return cfg
        return self._exchange(grid, "prune", msgs, self.sim.prune_timeout, parse)

    def embed_round(self, grid: Grid) -> tuple[dict, dict]:
        imgs = {"ref_x": self.ref.x.numpy(), "val_x": self.val.x.numpy()}  # images only, no labels
        msgs = {d: ("query.embed", wire.pack({"key": self.keys[d]}, imgs)) for d in self._live() if d in self.keys}

        def parse(dev, rep):
            r = wire.finite(wire.array(rep.content, "ref_f", "float32", (len(self.ref), None)), "ref_f")
            v = wire.finite(wire.array(rep.content, "val_f", "float32", (len(self.val), r.shape[1])), "val_f")
            if r.shape[1] <= len(self.ds.classes):
                raise wire.WireError(f"embedding width {r.shape[1]} leaves no features before the "
                                     f"{len(self.ds.classes)} log-probabilities")
            self.dims[dev] = r.shape[1]
            return r, v
        rep = self._exchange(grid, "embed", msgs, self.sim.embed_timeout, parse)
        return {d: r[0] for d, r in rep.items()}, {d: r[1] for d, r in rep.items()}

    def evaluate_round(self, grid: Grid) -> dict[int, dict]:
        """Sent once, after every model and head is fixed: test images without labels."""
        test = self.test
        msgs = {d: ("evaluate", wire.pack({"key": self.keys[d], "latency_runs": self.sim.latency_runs,
                                           "split": self.split},
                                          {"test_x": test.x.numpy()}))
                for d in self._live() if d in self.dims}

        def parse(dev, rep):
            cfg = wire.config_of(rep.content, ("latency_ms", "params", "file_mb", "sha256"))
            # the same width as this device's embed-round embeddings, or the head cannot read it
            cfg["features"] = wire.finite(wire.array(rep.content, "features", "float32",
                                                     (len(test), self.dims[dev])), "features")
            cfg["pred"] = wire.array(rep.content, "pred", "int64", (len(test),))
            if len(test) and not 0 <= cfg["pred"].min() <= cfg["pred"].max() < len(self.ds.classes):
                raise wire.WireError(f"predictions outside 0..{len(self.ds.classes) - 1}")
            return cfg
        return self._exchange(grid, "evaluate", msgs, self.sim.evaluate_timeout, parse)

    def fuse_round(self, ref_f: dict, val_f: dict, head_path: Path):
        """``head_seeds`` heads on the same embeddings; the validation split's selection half
        picks one, its gate half keeps or drops the MLP (``federation.train_heads``); saved."""
        self.report(round="fuse", done=0, total=1)
        t0 = time.monotonic()
        fz = train_heads(ref_f, val_f, self.ref, self.val, len(self.ds.classes), self.fuse_cfg, self.seed,
                  {d: self.groups[d] for d in ref_f})
        res = fz.heads[fz.pick]
        devices = [{"device": d, "key": self.keys[d], "dim": dm, "classes": self.groups[d]}
                   for d, dm in zip(fz.order, fz.dims)]
        metrics = {"val_acc": res.best_val, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
                   "head_seed": self.seed + fz.pick, "prior_val": res.prior_val, "gain_z": res.gain_z,
                   "gate": res.gate, "head": head_kind(res)}
        save_head(head_path, res.head, self.ds.classes, devices, self.fuse_cfg, metrics,
                  {"sha256": self.base_sha, "split": self.split})
        metrics.update(head_mb=checkpoint.file_mb(head_path), seconds=time.monotonic() - t0)
        return fz, metrics

    def device_rows(self, pruned: dict, ev: dict, fleet: dict) -> list[dict]:
        rows = []
        for d in range(self.n):
            group = self.groups[d] if d < len(self.groups) else []
            # a simulated group node holds its group's shard once grouped; a node with fixed
            # data (box, non-IID holdings) holds what it reported
            held = self.held.get(d, []) if self.fixed else group
            row = {"device": d, "node": self.node_names.get(d), "classes": group, "held": held,
                   "not_held": [c for c in group if c not in held], "key": self.keys.get(d),
                   "masked": d in self.masked, "budget": self.budgets.get(d)}
            if d in pruned:
                rep = pruned[d]["report"]
                row.update(reused=pruned[d]["reused"], images=pruned[d].get("images"),
                           **{k: rep.get(k) for k in ("params", "reduction", "param_mb", "finetune_seconds",
                                                      "latency_search")})
            if d in ev:
                e = ev[d]
                row.update(latency_ms=e["latency_ms"], latency_blocks_ms=e.get("latency_blocks_ms"),
                           runtime=e.get("runtime", "torch"),
                           latency_reused=e.get("latency_reused"), file_mb=e["file_mb"], params=e["params"],
                           val_acc=fleet["device_val_acc"].get(d),
                           **device_figures(e["pred"], self.test.y, self.groups[d]))
            rows.append(row)
        return rows

    def run(self, grid: Grid, grouping_key: dict, cached_groups: dict | None = None,
            node_timeout: float = 120.0) -> dict:
        """All four rounds for N devices; returns the N-run's result (the caller saves it).
        ``grouping_key`` identifies what the grouping depends on (base, split, data, settings)."""
        self.wait_for_nodes(grid, node_timeout)
        groups = self.stats_round(grid, cached_groups)
        write_json(self.out / "grouping.json", {**grouping_key, "groups": groups, "complete": not self.incomplete,
                                                "similarity": self.similarity.tolist()})
        pruned = self.prune_round(grid)
        ref_f, val_f = self.embed_round(grid)
        fz, metrics = self.fuse_round(ref_f, val_f, self.out / "fusion.pt")
        ev = self.evaluate_round(grid)  # the only time test images leave the server
        y = self.test.y
        test_f = {d: r["features"] for d, r in ev.items()}
        fused = fused_figures(fz.head, fz.order, fz.dims, test_f, y, self.ds.classes)
        x, mask = stack(test_f, fz.order, fz.dims, len(y))
        seed_accs = [head_accuracy(h.head, x, y, mask) for h in fz.heads]  # a spread, never a pick
        fused.update(seed_test_acc=seed_accs, seed_mean=float(np.mean(seed_accs)),
                     seed_sd=float(np.std(seed_accs, ddof=1)) if len(seed_accs) > 1 else None,
                     head_latency_ms=head_latency_ms(fz.head, x[:1], mask[:1]))
        fleet = fleet_figures(val_f, test_f, self.val.y, y, len(self.ds.classes))
        missing = [m for log in self.rounds for m in log.missing]
        self.incomplete += [f"device {m['device']} ({m['node']}) missing from the {m['round']} round: "
                            f"{m['reason']}" for m in missing]
        compute = {log.name: {self.node_names.get(d, str(d)): round(t, 3) for d, t in log.compute.items()}
                   for log in self.rounds}
        return {"devices": self.n, "groups": self.groups, "holdings": self.holdings,
                "fusion": {**metrics, **fused},
                "fleet": {k: v for k, v in fleet.items() if k != "device_val_acc"},
                "per_device": self.device_rows(pruned, ev, fleet),
                "incomplete": self.incomplete, "missing": missing,
                "rounds": {log.name: round(log.seconds, 2) for log in self.rounds},
                "node_compute_s": compute}
