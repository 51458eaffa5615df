"""The comparison is honest by construction: each split has one job, labels never leave the
server, partial statistics are never reused, replies are checked for value, the fleet is
compared with its own members. Fast: a tiny model and a fake Flower grid, no runtime.

Run: ``pytest tests/test_honest.py``
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from papm_core.config import FuseConfig, PruneConfig, SimConfig
from papm_core.data import Split

pytest.importorskip("flwr")
K = 10


class FakeGrid:
    """Records every message the strategy pushes; ``reply(message) -> RecordDict | None``
    answers it (None: no answer, so the round times out)."""

    def __init__(self, reply=lambda m: None, nodes=(11, 12)):
        self.sent, self.reply, self.nodes, self.pending = [], reply, list(nodes), []

    def get_node_ids(self):
        return self.nodes

    def push_messages(self, msgs):
        ids = []
        for m in msgs:
            mid = f"m{len(self.sent)}"
            self.sent.append(m)
            ids.append(mid)
            rep = self.reply(m)
            if rep is not None:
                self.pending.append((mid, rep))
        return ids

    def pull_messages(self, ids):
        out = [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid), has_error=lambda: False,
                               content=c) for mid, c in self.pending if mid in ids]
        self.pending = [p for p in self.pending if p[0] not in ids]
        return out


def _split(name, n, seed):
    g = torch.Generator().manual_seed(seed)
    return Split(name, torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.arange(n) % K, [str(c) for c in range(K)])


@pytest.fixture
def strategy(monkeypatch, tmp_path):
    from flwr.supercore.task_identity import TaskIdentity

    from papm_core.models import build_model, resnet18_spec
    from strategies.papm import PapmStrategy

    for attr in ("_run_id", "_node_id", "_task_id"):  # what Flower's runtime sets
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)
    torch.manual_seed(0)
    base = build_model(resnet18_spec(0.125)).eval()
    ds = SimpleNamespace(classes=[str(c) for c in range(K)], test=_split("test", 40, 3))
    sim = SimConfig(stats_timeout=0.3, prune_timeout=0.3, embed_timeout=0.3, evaluate_timeout=0.3)
    strat = PapmStrategy(2, base, "sha", {"seed": 0}, ds, _split("ref", 30, 1), _split("val", 20, 2),
                         PruneConfig(classes=[0]), FuseConfig(), sim, tmp_path, 0)
    strat.nodes, strat.node_names = [11, 12], {}
    return strat


def test_no_message_carries_validation_or_test_labels(strategy):
    """Every message the strategy builds in the prune, embed and evaluate rounds holds images
    and model weights only: no array of labels, and nothing equal to the val/test labels."""
    grid = FakeGrid()
    strategy.groups, strategy.keys, strategy.dims = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], {0: "a", 1: "b"}, {0: 30, 1: 30}
    for rnd in (strategy.prune_round, strategy.embed_round, strategy.evaluate_round):
        strategy.masked = set()
        strategy.keys, strategy.dims = {0: "a", 1: "b"}, {0: 30, 1: 30}  # as if the earlier rounds answered
        rnd(grid)
    assert len(grid.sent) == 6
    for m in grid.sent:
        arrays = m.content.array_records.get("arrays") or {}
        names = [n for n in arrays if not n.startswith("w.")]
        assert names and all(n.endswith("_x") for n in names), (m.metadata.message_type, names)
        cfg = json.loads(m.content.config_records["config"]["json"])
        assert not {"val_y", "test_y", "ref_y", "labels"} & set(cfg)
        for n in names:
            assert arrays[n].numpy().dtype == np.uint8  # images, never int64 labels


def _sent_prune(strategy) -> list[dict]:
    grid = FakeGrid()
    strategy.masked = set()
    strategy.prune_round(grid)  # no node answers: the configs sent are what is checked
    return [json.loads(m.content.config_records["config"]["json"])["prune"] for m in grid.sent]


def test_each_device_is_pruned_to_its_own_budget(strategy):
    """sim.budgets cycles over the devices, a node's own budget and runtime (a box's node
    config) win, a fleet budget gives each of N devices 1/N of it, and every device's
    budget is recorded as written."""
    from dataclasses import replace

    from papm_core.util import PapmError

    strategy.groups = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    strategy.sim = replace(strategy.sim, budgets="0.5, 2.5ms")
    a, b = _sent_prune(strategy)
    assert (a["params_reduction"], a["target_latency_ms"], b["target_latency_ms"]) == (0.5, None, 2.5)
    assert a["classes"] == [0, 1, 2, 3, 4] and strategy.budgets == {0: "0.5", 1: "2.5ms"}
    strategy.node_setup = {1: {"budget": "1.2MB", "runtime": "onnxruntime"}}
    a, b = _sent_prune(strategy)
    assert a["params_reduction"] == 0.5 and (b["target_size_mb"], b["runtime"]) == (1.2, "onnxruntime")
    strategy.node_setup, strategy.sim = {}, replace(strategy.sim, budgets="", fleet_budget="1.0x")
    assert [p["params_reduction"] for p in _sent_prune(strategy)] == [0.5, 0.5]
    assert strategy.budgets == {0: "0.5", 1: "0.5"}
    strategy.sim = replace(strategy.sim, fleet_budget="")
    assert [p["params_reduction"] for p in _sent_prune(strategy)] == [0.77, 0.77]  # the preset's
    with pytest.raises(PapmError, match="not both"):
        replace(strategy.sim, budgets="0.5", fleet_budget="1.0x").validate()


def test_a_box_states_its_budget_in_its_node_config(tmp_path):
    """A box's node config budget and runtime reach the stats round's identity; a malformed
    one is the node's one-line error (the strategy masks that box)."""
    from flwr.app import Context, RecordDict

    from clients.app import NodeSetup
    from papm_core.util import PapmError

    def node(**nc):
        return NodeSetup(Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                            node_config={"name": "pi4", "data": "x.npz", "store": str(tmp_path), **nc}))
    n = node(budget="2.5ms", runtime="onnxruntime-int8")
    assert (n.budget, n.runtime, n.simulated) == ("2.5ms", "onnxruntime-int8", False)
    with pytest.raises(PapmError, match="node config budget of pi4 = '2.5 s'"):
        node(budget="2.5 s")
    with pytest.raises(PapmError, match="node config runtime of pi4 = 'tflite'"):
        node(runtime="tflite")


def test_an_embedding_of_another_width_masks_the_node(strategy):
    """A node whose test embeddings differ in width from its embed-round ones is masked with
    its reason; the round goes on with the other node (no exception)."""
    from clients import wire

    n = len(strategy.test)

    def reply(m):
        dev = strategy.nodes.index(m.metadata.dst_node_id)
        width = 30 if dev == 0 else 31  # device 1 changed width since the embed round
        return wire.pack({"latency_ms": 1.0, "params": 1, "file_mb": 0.1, "sha256": "x"},
                         {"features": np.zeros((n, width), np.float32), "pred": np.zeros(n, np.int64)})
    strategy.keys, strategy.dims = {0: "a", 1: "b"}, {0: 30, 1: 30}
    out = strategy.evaluate_round(FakeGrid(reply))
    assert set(out) == {0} and strategy.masked == {1}
    miss = strategy.rounds[-1].missing
    assert [m["device"] for m in miss] == [1] and "shape" in miss[0]["reason"]


def test_non_finite_embeddings_mask_the_node(strategy):
    from clients import wire

    def reply(m):
        dev = strategy.nodes.index(m.metadata.dst_node_id)
        f = np.zeros((len(strategy.ref), 30), np.float32)
        if dev == 1:
            f[0, 0] = np.nan
        return wire.pack({}, {"ref_f": f, "val_f": np.zeros((len(strategy.val), 30), np.float32)})
    strategy.keys = {0: "a", 1: "b"}
    ref_f, _ = strategy.embed_round(FakeGrid(reply))
    assert set(ref_f) == {0} and "non-finite" in strategy.rounds[-1].missing[0]["reason"]


def _stats_reply(strategy, fail: int | None):
    from clients import wire
    from papm_core.nodedata import held_classes

    def reply(m):
        dev = strategy.nodes.index(m.metadata.dst_node_id)
        if dev == fail:
            return None  # this node never answers the stats round
        held = held_classes(K, dev, 2)
        count = np.zeros(K)
        count[held] = 4.0
        prob = np.zeros((K, K))
        prob[held] = np.eye(K)[held] * 2.0 + 0.2  # rows of 2 + 10 * 0.2 = 4 = count
        outer = np.einsum("ck,cl->ckl", prob, prob) / 4.0
        return wire.pack({"name": f"node-{dev}", "partition": dev, "held": held, "simulated": True},
                         {"count": count, "prob_sum": prob, "outer_sum": outer, "logit_sum": prob.copy()})
    return reply


def test_statistics_missing_a_node_are_not_kept_and_the_run_is_incomplete(strategy):
    strategy.stats_round(FakeGrid(_stats_reply(strategy, fail=1)), None)
    assert strategy.stats is None  # never offered to the cache
    assert strategy.incomplete and "no statistics for classes [1, 3, 5, 7, 9]" in strategy.incomplete[0]
    assert sorted(c for g in strategy.groups for c in g) == [0, 2, 4, 6, 8]


def test_complete_statistics_are_kept(strategy):
    strategy.stats_round(FakeGrid(_stats_reply(strategy, fail=None)), None)
    assert strategy.stats is not None and not strategy.incomplete
    assert sorted(c for g in strategy.groups for c in g) == list(range(K))


def test_a_partial_grouping_is_never_reused(tmp_path):
    from server.app import cached_grouping, grouping_key

    sim = SimConfig()
    key = {"base_sha256": "b", "split": {}, "data": "d"}
    g = {"key": grouping_key(key, sim), "groups": [[0, 2, 4], [6, 8]], "complete": True, "similarity": []}
    (tmp_path / "grouping.json").write_text(json.dumps(g))
    assert cached_grouping(tmp_path, None, key, 2, sim, K) is None  # covers 5 of 10 classes
    whole = {**g, "groups": [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]}
    for bad in ({**whole, "complete": False}, {**whole, "key": grouping_key({**key, "data": "other"}, sim)},
                {**whole, "key": grouping_key(key, SimConfig(grouping="covariance"))}):
        (tmp_path / "grouping.json").write_text(json.dumps(bad))
        assert cached_grouping(tmp_path, None, key, 2, sim, K) is None
    (tmp_path / "grouping.json").write_text(json.dumps(whole))
    assert cached_grouping(tmp_path, None, key, 2, sim, K)["groups"] == whole["groups"]


def test_head_gate_is_decided_on_images_that_chose_nothing():
    """The validation halves are disjoint and stratified; the gate is computed on the gate
    half's images alone, and a gain it cannot call significant restores the prior exactly."""
    from papm_core.fusion import FuseResult, build_head, gate, halves

    y = np.repeat(np.arange(4), 25)
    a, b = halves(y)
    assert not set(a) & set(b) and len(a) + len(b) == 100
    assert all((y[a] == c).sum() in (12, 13) for c in range(4))
    head = build_head([6, 6], 4, owners=[[0, 1], [2, 3]])
    torch.manual_seed(0)
    with torch.no_grad():
        head.mlp[-1].weight.normal_()  # a trained MLP that changes the prior's answers
    feats = torch.randn(100, 12)
    res = FuseResult(head, 50.0, 3, 3, [], prior_val=40.0)
    gate(res, feats[b].numpy(), y[b], min_gain_z=99.0)
    assert res.gate["images"] == len(b) and not res.kept_mlp  # unreachable z: the prior alone again
    prior = head.owner_prior(feats, torch.ones(100, 2)).argmax(1)
    assert torch.equal(head(feats).argmax(1), prior)


def test_fleet_figures_pick_the_best_device_on_validation():
    """The best single device is the one most accurate on validation, reported on test even
    where another device is better on test; the average of outputs is computed too."""
    from papm_core.federation import fleet_figures

    vy, ty = torch.arange(20) % K, torch.arange(20) % K

    def feats(right: np.ndarray, top: float):  # answers right on the marked images, log-prob `top`
        lp = np.full((20, K), -5.0, np.float32)
        y = np.arange(20) % K
        lp[np.arange(20), np.where(right, y, (y + 1) % K)] = top
        return np.concatenate([np.zeros((20, 3), np.float32), lp], 1)
    val = {0: feats(np.arange(20) < 15, -1.0), 1: feats(np.arange(20) < 10, -0.01)}  # device 0 better on val
    test = {0: feats(np.arange(20) < 8, -1.0), 1: feats(np.arange(20) < 18, -0.01)}  # device 1 better on test
    f = fleet_figures(val, test, vy, ty, K)
    assert f["best_single_device"] == 0 and f["best_single_test_acc"] == 40.0
    assert f["device_val_acc"] == {0: 75.0, 1: 50.0}
    # averaged probabilities: the confident device 1 wins every disagreement, so the average
    # is right exactly where device 1 is (test: 18 of 20; validation: 10 of 20)
    assert f["average_test_acc"] == 90.0 and f["average_val_acc"] == 50.0


def test_device_selects_on_its_own_held_out_images(cifar, tmp_path):
    """A one-class device's epochs are chosen on its own held-out slice (never the server's
    validation split), by the distillation objective: a criterion that does not reward
    always answering its one class."""
    from papm_core.config import load_preset
    from papm_core.models import build_model, resnet18_spec
    from papm_core.specialize import base_split, device_data, prune, reference_splits

    meta = {"config": {"val_size": 200, "seed": 0, "per_class": 100}}
    cfg = load_preset("smoke", "prune", classes=[3], epochs=2, min_steps=0, precision="fp32")
    c = reference_splits(cifar, base_split(meta, cfg.ref_size, cfg.node_val))
    data = device_data(cifar, meta, cfg, "cpu")
    server_val = {bytes(x.numpy().tobytes()) for x in c.val.x}
    assert data.val.y.unique().tolist() == [3]
    assert not {bytes(x.numpy().tobytes()) for x in data.val.x} & server_val
    assert not {bytes(x.numpy().tobytes()) for x in data.val.x} & {bytes(x.numpy().tobytes()) for x in data.shard.x}
    torch.manual_seed(0)
    base = build_model(resnet18_spec(0.125, K)).eval()
    rep = prune(base, data, cfg).report["finetune"]
    hist = {h["epoch"]: h for h in rep["history"]}
    assert rep["best_val_loss"] == min(h["val_loss"] for h in hist.values() if h["val_loss"] is not None)
    assert hist[rep["best_epoch"]]["val_loss"] == rep["best_val_loss"]


def test_a_late_reply_from_an_earlier_round_is_never_read(strategy):
    """A grid that hands back every reply it holds (not only the ones asked for): the late
    answer to an earlier round's message is ignored, neither read nor counted as a node."""
    from clients import wire

    grid = FakeGrid(lambda m: None)
    strategy.keys, strategy.dims = {0: "a", 1: "b"}, {0: 30, 1: 30}
    strategy.evaluate_round(grid)  # nobody answers: both masked after the timeout
    late = wire.pack({"latency_ms": 1.0, "params": 1, "file_mb": 0.1, "sha256": "x"},
                     {"features": np.zeros((len(strategy.test), 30), np.float32),
                      "pred": np.zeros(len(strategy.test), np.int64)})
    grid.pending.append(("m0", late))  # the answer to the first evaluate message, too late
    leaky = grid.pull_messages
    grid.pull_messages = lambda ids: leaky([mid for mid, _ in grid.pending])  # hands back everything
    strategy.masked = set()
    grid.reply = lambda m: None
    assert strategy.evaluate_round(grid) == {}
    assert [m["device"] for m in strategy.rounds[-1].missing] == [0, 1]  # timeouts, nothing else
    assert all("timeout" in m["reason"] for m in strategy.rounds[-1].missing)


class ErrorReply(FakeGrid):
    """A grid on which the nodes in ``failing`` answer with Flower's error reply (a ClientApp
    that raised), the others with ``reply``."""

    def __init__(self, reply, failing, nodes=(11, 12)):
        super().__init__(reply, nodes)
        self.failing = set(failing)

    def pull_messages(self, ids):
        out = super().pull_messages(ids)
        for r in out:
            if self.sent[int(r.metadata.reply_to_message_id[1:])].metadata.dst_node_id in self.failing:
                r.has_error = lambda: True
                r.error = SimpleNamespace(reason="<class 'RuntimeError'>:<'injected failure'>")
        return out


def test_a_node_that_fails_the_stats_round_is_named_by_its_node_id_and_last(strategy):
    """Node 11 raises in the stats round; node 12 answers: node 11 never said who it is, so it
    is named by its Flower node id, ordered after the nodes that answered, and masked; the
    groups come from node 12's statistics alone (here they cover every class)."""
    from clients import wire

    k = K
    stats = {"count": np.full(k, 2.0), "prob_sum": np.full((k, k), 0.2), "outer_sum": np.full((k, k, k), 0.02),
             "logit_sum": np.eye(k)}
    ident = {"name": "node-1", "partition": 1, "held": list(range(k)), "simulated": True}
    grid = ErrorReply(lambda m: wire.pack(ident, stats), failing=[11])
    groups = strategy.stats_round(grid, None)
    assert sorted(c for g in groups for c in g) == list(range(k))
    assert strategy.nodes == [12, 11] and strategy.masked == {1}
    assert [(m["device"], m["node"]) for m in strategy.rounds[-1].missing] == [(1, "11")]
    assert "injected failure" in strategy.rounds[-1].missing[0]["reason"]
    assert strategy.node_names == {0: "node-1"}
    # every node fails: the run stops with one line naming each node and its reason
    from papm_core.util import PapmError

    strategy.nodes, strategy.masked, strategy.node_names = [11, 12], set(), {}
    with pytest.raises(PapmError, match=r"no node answered the stats round \(11: error: .*injected failure.*; 12: "):
        strategy.stats_round(ErrorReply(lambda m: wire.pack(ident, stats), failing=[11, 12]), None)


def test_keys_cover_what_changes_a_result(tmp_path):
    """A device model's key covers the node's data; teacher tables are keyed by the precision
    that ran, not the setting's name; a run's settings include every [sim] key but the
    device counts, and the data's fingerprint."""
    from papm_core.config import settings_diff
    from papm_core.models import build_model, resnet18_spec
    from papm_core.node import prune_key
    from papm_core.teacher import cached_flip_logits
    from papm_core.util import use_bf16

    assert prune_key("b", [1], {}, {}, "data-a") != prune_key("b", [1], {}, {}, "data-b")
    torch.manual_seed(0)
    model = build_model(resnet18_spec(0.125)).eval()
    cached_flip_logits(model, _split("ref", 4, 0), tmp_path, "auto")
    ran = "bf16" if use_bf16(torch.device("cpu"), "auto") else "fp32"
    names = [p.name for p in tmp_path.glob("*.npy")]
    assert names and all(f"-{ran}-" in n and "-auto-" not in n for n in names)
    a = {"sim": {"devices": "2-10", "grouping": "correlation", "test_per_class": 0}, "prune": {"classes": [0]},
         "data": {"fingerprint": "x"}}
    assert settings_diff(a, {**a, "sim": {**a["sim"], "devices": "5"}, "prune": {"classes": [3]}}) == []
    assert settings_diff(a, {**a, "sim": {**a["sim"], "grouping": "covariance"}}) == ["sim.grouping"]
    assert settings_diff(a, {**a, "sim": {**a["sim"], "test_per_class": 100}}) == ["sim.test_per_class"]
    assert settings_diff(a, {**a, "data": {"fingerprint": "y"}}) == ["data.fingerprint"]
