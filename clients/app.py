"""The PAPM ClientApp: one edge device. Thin handlers over ``papm_core.node``.

Message types (the strategy in ``strategies/papm.py`` sends them):

- ``query.stats``: the base model -> class statistics of its predictions on this node's
  validation images, plus the classes the node holds. Statistics only, never data.
- ``train.prune``: classes, r, alpha, recipe (+ the public reference images) -> PAPM
  pruning and fine-tuning on the local shard, epochs selected on the node's own held-out
  images; the model stays in the node's store, the reply carries metrics, the width spec
  and the data's content hash (part of the model key), never weights.
- ``query.embed``: public and validation images, no labels -> frozen embeddings of the
  node's pruned model (pooled features and its own class log-probabilities,
  ``papm_core.embedding.device_embedding``).
- ``evaluate``: test images, no labels -> embeddings, the model's own predictions, and
  this node's batch-1 latency measured here.

Where a node finds its data: an edge box sets ``data`` (a folder or archive of its own
images; see docs/deploy.md) and ``store`` in its node config. A simulated node has Flower's
``partition-id``/``num-partitions`` and reads the run config's ``data``: before grouping
it holds the classes dealt to it (``papm_core.nodedata.held_classes``), after grouping the
shard of the group the strategy assigns to it.

Example: ``flwr run . papm-sim --run-config 'out="/abs/runs/x/n2"'`` (sim.py does this)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import wire
from clients.mods import compute_time, test_faults
from clients.runconfig import RunConfig
from papm_core import budget
from papm_core.config import RUNTIMES, from_dict
from papm_core.data import Split, spread
from papm_core.export import CALIB_IMAGES
from papm_core.finetune import epoch_images, finetune_epochs
from papm_core.loader import normalize
from papm_core.node import embed_images, ensure_pruned, evaluate_images, find_pruned, local_stats
from papm_core.nodedata import held_classes, holding_of, local_data
from papm_core.util import PapmError, atomic_write, torch_threads

app = ClientApp(mods=[compute_time, test_faults])  # compute_s on every reply; test-only faults


class NodeSetup:
    """This node's identity, data source and store, from node config then run config."""

    def __init__(self, ctx: Context):
        nc, rc = ctx.node_config, RunConfig.read(ctx.run_config)
        self.simulated = "partition-id" in nc and "data" not in nc
        self.partition = int(nc.get("partition-id", -1))
        self.partitions = int(nc.get("num-partitions", 0))
        self.name = str(nc.get("name", f"node-{self.partition}" if self.simulated else "box"))
        self.source = str(nc.get("data", rc.data)) or None
        self.store = Path(str(nc.get("store", rc.store)) or Path.home() / ".cache/papm/node")
        self.deal_seed = rc.deal_seed
        self.holdings = rc.holdings if self.simulated else "box"
        # fixed data (an edge box, or a simulated node under non-IID holdings): the node
        # trains on what it holds; otherwise it holds whichever group shard it is given
        self.fixed = self.holdings != "group"
        # an edge box's own budget and runtime (its node config); the strategy plans with them
        self.budget = str(nc.get("budget", "")).strip()
        self.runtime = str(nc.get("runtime", "")).strip()
        if self.budget:
            budget.parse(self.budget, f"node config budget of {self.name}")
        if self.runtime and self.runtime not in RUNTIMES:
            raise PapmError(f"node config runtime of {self.name} = {self.runtime!r}: expected one of "
                            f"{', '.join(RUNTIMES)}")
        threads = rc.client_threads
        if threads > 0:
            torch.set_num_threads(threads)  # match this client's CPU share: no oversubscription
        # fine-tuning may use cores no other client does (N below the cores): sim.py decides
        self.train_threads = rc.train_threads if self.simulated else 0

    def data(self, split: dict, held: list[int] | None = None):
        """This node's data (``papm_core.nodedata.local_data``), cut to its part under holdings."""
        part = None
        if self.simulated and self.fixed:
            part = (self.holdings, self.partition, self.partitions, self.deal_seed)
        return local_data(self.source, split, held, part)

    def progress(self, **state) -> None:
        """A small JSON beside the store that sim.py shows as the node's live state."""
        path = self.store / "progress" / f"{self.name}.json"
        text = json.dumps({"node": self.name, "time": time.time(), **state})
        try:
            atomic_write(path, lambda p: p.write_text(text))
        except OSError:
            pass  # progress is best effort; the work itself must not fail on it


def _reply(msg: Message, config: dict, arrays=None) -> Message:
    """The reply (the ``compute_time`` mod adds the handler's own seconds)."""
    return Message(wire.pack(config, arrays), reply_to=msg)


@app.query("stats")
def stats(msg: Message, ctx: Context) -> Message:
    node = NodeSetup(ctx)
    cfg = wire.config_of(msg.content, ("split", "num_classes"))
    ident = {"name": node.name, "partition": node.partition, "simulated": node.simulated,
             "holdings": node.holdings, "budget": node.budget, "runtime": node.runtime}
    data = None
    if node.fixed:  # what it holds decides which group it serves (image counts per class)
        data = node.data(cfg["split"])
        held, held_n = holding_of(data)
        stat_classes = sorted(set(data.val.y.unique().tolist()))  # all its held-out images
    else:  # a simulated node of group holdings: the classes dealt to it
        held = held_classes(int(cfg["num_classes"]), node.partition, node.partitions, node.deal_seed)
        held_n, stat_classes = [], held
    ident.update(held=held, held_n=held_n)
    if cfg.get("identify_only"):
        return _reply(msg, ident)
    base = wire.model_from(msg.content, wire.config_of(msg.content, ("spec",))["spec"])
    # local_stats keeps the given classes itself: a node with fixed data is read once
    st = local_stats(base, data if data is not None else node.data(cfg["split"], stat_classes), stat_classes)
    arrays = {k: getattr(st, k) for k in ("count", "prob_sum", "outer_sum", "logit_sum")}
    return _reply(msg, ident, arrays)


@app.train("prune")
def prune(msg: Message, ctx: Context) -> Message:
    node = NodeSetup(ctx)
    cfg = wire.config_of(msg.content, ("spec", "split", "prune", "base_sha256"))
    pcfg = from_dict("prune", {**cfg["prune"], "device": "cpu" if not torch.cuda.is_available() else "cuda"})
    # pruning and fine-tuning run where the node's accelerator is (the data follows the model)
    base = wire.model_from(msg.content, cfg["spec"]).to(pcfg.device)
    public = {}
    if "ref_x" in (msg.content.array_records.get("arrays") or {}):
        x = wire.images(msg.content, "ref")  # unlabelled: the device distils on them
        public["ref"] = Split("ref", torch.from_numpy(x), torch.zeros(len(x), dtype=torch.int64), [])
    data = node.data(cfg["split"])
    if node.fixed:
        held = holding_of(data)[0]
        if not set(pcfg.classes) & set(held):
            raise PapmError(f"{node.name} holds none of classes {pcfg.classes} (it holds {held})")
    if pcfg.scope != "all":
        data = node.data(cfg["split"], pcfg.classes)
    for s in public.values():
        s.classes = data.classes
    own = int(torch.isin(data.private.y, torch.tensor(pcfg.classes)).sum())
    per_epoch = epoch_images(pcfg, own, len(data.private))
    node.progress(stage="prune", classes=pcfg.classes, epoch=0, epochs=finetune_epochs(pcfg, per_epoch))
    # a latency budget is searched at the thread count the device is timed with
    with torch_threads(node.train_threads if pcfg.target_latency_ms is None else 0):
        path, report, reused = ensure_pruned(
            base, cfg["base_sha256"], data, pcfg, cfg["split"], public, node.store,
            on_epoch=lambda h: node.progress(stage="prune", classes=pcfg.classes, epoch=h["epoch"],
                                             epochs=h.get("epochs", pcfg.epochs)))
    node.progress(stage="idle")
    keep = ("params", "base_params", "reduction", "target_reduction", "param_mb", "file_mb",
            "threshold", "layers", "finetune", "prune_seconds", "finetune_seconds", "key", "latency_search")
    return _reply(msg, {"name": node.name, "reused": reused, "path": str(path), "images": own,
                        "data_fingerprint": data.fingerprint, "report": {k: report.get(k) for k in keep}})


def _stored_model(msg: Message, ctx: Context):
    """(node, config, path of the pruned model the message names) for embed/evaluate."""
    node = NodeSetup(ctx)
    cfg = wire.config_of(msg.content, ("key",))
    return node, cfg, find_pruned(node.store, str(cfg["key"]))


@app.query("embed")
def embed(msg: Message, ctx: Context) -> Message:
    node, _, path = _stored_model(msg, ctx)
    out = {}
    for name in ("ref", "val"):
        out[f"{name}_f"] = embed_images(path, wire.images(msg.content, name), node.store)
    return _reply(msg, {"name": node.name}, out)


@app.evaluate()
def evaluate(msg: Message, ctx: Context) -> Message:
    node, cfg, path = _stored_model(msg, ctx)

    def calib(classes: list[int]):  # an int8 runtime's calibration: the node's own training images
        shard = node.data(cfg["split"], classes).private
        return normalize(spread(shard, CALIB_IMAGES, len(classes)).x)
    res = evaluate_images(path, wire.images(msg.content, "test"), node.store, int(cfg.get("latency_runs", 200)),
                          calib if "split" in cfg else None)
    arrays = {"features": res.pop("features"), "pred": res.pop("pred")}
    return _reply(msg, {"name": node.name, "pid": os.getpid(), **res}, arrays)
