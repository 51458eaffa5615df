"""Mergeable class statistics and deterministic covariance-based grouping."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from helpers import run_cli, write_tree

from papm_core import checkpoint
from papm_core.data import subsample
from papm_core.grouping import (
    ClassStats,
    class_stats,
    cluster,
    group_classes,
    merge_stats,
    parse_devices,
    read_groups,
    similarity,
)
from papm_core.models import build_model, resnet18_spec
from papm_core.util import PapmError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(resnet18_spec(0.125)).eval()
    m.train()
    with torch.no_grad():  # non-trivial BN statistics, so predictions differ per class
        m(torch.randn(64, 3, 32, 32))
    return m.eval()


@pytest.mark.parametrize("seed,parts", [(0, 2), (1, 3), (2, 5)])
def test_merged_shards_equal_union(cifar, model, seed, parts):
    data = subsample(cifar.test, 40, seed)  # 400 real images, 10 classes
    rng = np.random.default_rng(seed)
    owner = torch.as_tensor(rng.integers(0, parts, len(data)))
    shards = [data.take(torch.nonzero(owner == k).flatten()) for k in range(parts)]
    per_shard = [class_stats(model, s, batch_size=64) for s in shards]
    merged = merge_stats(per_shard)
    whole = class_stats(model, data, batch_size=128)
    # the model runs in float32 and batch composition changes its rounding (~1e-8);
    # the statistics themselves are float64 sums
    for f in ("count", "prob_sum", "outer_sum", "logit_sum"):
        np.testing.assert_allclose(getattr(merged, f), getattr(whole, f), rtol=1e-6, atol=1e-6)
    assert merged.count.tolist() == [40.0] * 10
    # associativity: another grouping of the same parts gives the same result
    alt = merge_stats([merge_stats(per_shard[1:]), merge_stats(per_shard[:1])])
    np.testing.assert_allclose(alt.outer_sum, merged.outer_sum, rtol=1e-12, atol=1e-12)
    assert group_classes(merged, 3) == group_classes(whole, 3)


def test_remapped_shard_uses_global_ids(cifar, model):
    sh = subsample(cifar.test, 10).shard([7, 2], remap=True)
    st = class_stats(model, sh)
    assert np.flatnonzero(st.count).tolist() == [2, 7] and st.count.shape == (10,)


def planted(sizes, rng, noise=0.05):
    """A similarity matrix with blocks of high similarity, classes shuffled."""
    k = sum(sizes)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(k)
    labels = labels[perm]
    sim = np.where(labels[:, None] == labels[None, :], 0.8, -0.1) + rng.normal(0, noise, (k, k))
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 1.0)
    truth = sorted((sorted(np.flatnonzero(labels == g).tolist()) for g in range(len(sizes))),
                   key=lambda g: g[0])
    return sim, truth


@pytest.mark.parametrize("sizes", [[4, 6], [3, 3, 4], [2, 2, 3, 3, 2], [5, 1, 1, 3, 2, 4, 1]])
def test_planted_clusters_recovered(sizes):
    sim, truth = planted(sizes, np.random.default_rng(len(sizes)))
    assert cluster(sim, len(sizes)) == truth
    assert cluster(sim, len(sizes)) == cluster(sim.copy(), len(sizes))  # deterministic


def test_edge_counts_and_bad_n():
    sim, _ = planted([3, 4], np.random.default_rng(0))
    assert cluster(sim, 7) == [[i] for i in range(7)]
    assert cluster(sim, 1) == [list(range(7))]
    for bad in (0, 8, -1):
        with pytest.raises(PapmError, match=r"must lie in \[1, 7\]"):
            cluster(sim, bad)


def test_max_group_size_rebalances():
    sim, _ = planted([6, 2], np.random.default_rng(3))
    groups = cluster(sim, 2, max_group_size=4)
    assert sorted(len(g) for g in groups) == [4, 4] and sorted(sum(groups, [])) == list(range(8))
    with pytest.raises(PapmError, match="cannot hold"):
        cluster(sim, 2, max_group_size=3)


def test_similarity_methods_and_stats_validation(cifar, model):
    st = class_stats(model, subsample(cifar.test, 20))
    for m in ("correlation", "covariance", "mean-logit-cosine"):
        s = similarity(st, m)
        assert s.shape == (10, 10) and np.allclose(np.diag(s), 1.0, atol=1e-6)
    with pytest.raises(PapmError, match="unknown similarity"):
        similarity(st, "nope")
    back = ClassStats.from_dict(json.loads(json.dumps(st.to_dict())))
    np.testing.assert_array_equal(back.outer_sum, st.outer_sum)
    bad = st.to_dict()
    bad["outer_sum"] = bad["outer_sum"][:3]
    with pytest.raises(PapmError, match="malformed"):
        ClassStats.from_dict(bad)


def test_parse_devices():
    assert parse_devices("2-10") == list(range(2, 11))
    assert parse_devices("2,5,10") == [2, 5, 10]
    with pytest.raises(PapmError):
        parse_devices("5-2")


def test_cli_outputs_round_trip(tmp_path, model):
    tree = write_tree(tmp_path / "tree", classes=("a", "b", "c", "d"), per_split=(8, 2))
    base = checkpoint.save(tmp_path / "base.pt", build_model(resnet18_spec(0.125, 4)), kind="base",
                           class_names=["a", "b", "c", "d"], config={"val_size": 8, "seed": 0})
    res = run_cli("group", "--base", base, "--devices", "2-4", "--data", tree, "--ref-size", "8",
                  "--out-dir", tmp_path / "result")
    assert res.returncode == 0, res.stderr
    assert "Device 4: [[0], [1], [2], [3]]" in res.stdout
    groups = read_groups(tmp_path / "result" / "groups.json")
    rows = list(csv.DictReader(open(tmp_path / "result" / "deploy_inf.csv")))
    assert [int(r["devices"]) for r in rows] == [2, 3, 4]
    for r in rows:
        assert json.loads(r["groups"]) == groups[int(r["devices"])]
        assert f"Device {r['devices']}: {r['groups']}" in res.stdout
    assert sorted(sum(groups[2], [])) == [0, 1, 2, 3] and len(groups[3]) == 3
    for png in ("similarity.png", "dendrogram.png"):
        assert (tmp_path / "result" / png).read_bytes()[:4] == b"\x89PNG"
    bad = run_cli("group", "--base", base, "--devices", "2-5", "--data", tree, "--ref-size", "8",
                  "--out-dir", tmp_path / "result")
    assert bad.returncode == 2 and "outside [1, 4]" in bad.stderr
    assert read_groups(tmp_path / "result" / "groups.json") == groups  # left intact
