"""Device budgets: one syntax (0.77, 1.2MB, 2.5ms, fleet 1.0x) and the latency search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from papm_core import budget
from papm_core.config import PruneConfig
from papm_core.models import build_model, count_params, resnet18_spec, spec_params
from papm_core.prune import search_keep, slim
from papm_core.util import PapmError


@pytest.mark.parametrize("text,kind,value", [("0.77", "reduction", 0.77), (" 1.2MB", "mb", 1.2),
                                             ("2.5ms", "ms", 2.5), ("3 MS", "ms", 3.0), (".5", "reduction", 0.5)])
def test_budget_syntax(text, kind, value):
    b = budget.parse(text)
    assert (b.kind, b.value) == (kind, value) and budget.parse(str(b)) == b
    cfg = budget.apply(PruneConfig(classes=[0], target_size_mb=9.0), b)
    assert [cfg.params_reduction == value, cfg.target_size_mb == value, cfg.target_latency_ms == value] == \
        [kind == "reduction", kind == "mb", kind == "ms"]


@pytest.mark.parametrize("text,msg", [("1.5", "lies in (0, 1)"), ("0", "lies in (0, 1)"), ("2kb", "expected a"),
                                      ("1.0x", "expected a"), ("", "expected a"), ("0ms", "are positive")])
def test_bad_budgets_are_one_line_naming_the_setting(text, msg):
    with pytest.raises(PapmError, match=r"sim\.budgets = ") as e:
        budget.parse_list(f"0.5, {text}" if text else ",0.5,x", "sim.budgets")
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_fleet_budget_splits_the_base_parameters_evenly():
    fleet = budget.parse("1.0x", fleet=True)
    assert [budget.fleet_reduction(fleet, n) for n in (2, 5, 10)] == pytest.approx([0.5, 0.8, 0.9])
    assert budget.fleet_reduction(fleet, 1) == pytest.approx(budget.STEP)  # one device: the base less a step
    with pytest.raises(PapmError, match="a multiple of the base"):
        budget.parse("0.5", "sim.fleet_budget", fleet=True)


@pytest.fixture
def model_and_scores():
    m = build_model(resnet18_spec(0.25)).eval()
    rng = np.random.default_rng(0)
    from papm_core.prune import units
    return m, {u.name: rng.random(u.width) for u in units(m)}


def _fake_clock(monkeypatch, spread=0.0):
    """Latency = parameters / 100k ms: monotone, so the right answer is known exactly."""
    timed = []

    def fake(model, runtime, calib, runs=200):
        timed.append(count_params(model))
        return {"ms": count_params(model) / 1e5, "spread_ms": spread}
    monkeypatch.setattr(budget, "time_ms", fake)
    return timed


def test_latency_search_lands_on_the_smallest_reduction_that_meets_the_target(monkeypatch, model_and_scores):
    m, scores = model_and_scores
    timed = _fake_clock(monkeypatch)
    target = 0.6 * spec_params(m.spec) / 1e5
    cfg = PruneConfig(classes=[0], target_latency_ms=target)
    keep, _, rec = budget.fit_latency(m, scores, cfg, torch.zeros(1, 3, 32, 32))
    got = count_params(slim(m, keep)) / 1e5
    assert got <= target and rec["achieved_ms"] == pytest.approx(got)
    one_less, _ = search_keep(m, scores, rec["reduction"] - budget.STEP, cfg.min_channels)
    assert count_params(slim(m, one_less)) / 1e5 > target  # a grid step less pruning misses it
    assert len(rec["candidates"]) == len(timed) - 1 <= 10  # the base is timed too; bisection is short
    assert rec["reduction"] == pytest.approx(0.4, abs=0.02)


def test_unreachable_or_noisy_latency_targets_fail_in_one_line(monkeypatch, model_and_scores):
    m, scores = model_and_scores
    _fake_clock(monkeypatch, spread=0.05)
    cfg = PruneConfig(classes=[0], target_latency_ms=1e-4)
    with pytest.raises(PapmError, match="out of reach here: the smallest model --min-channels 8"):
        budget.fit_latency(m, scores, cfg, torch.zeros(1, 3, 32, 32))
    n = budget._deepest(m, scores, cfg)
    keep, _ = search_keep(m, scores, budget.STEP * n, cfg.min_channels)
    floor = count_params(slim(m, keep)) / 1e5
    cfg.target_latency_ms = floor + 0.01  # reachable, but inside the 0.05 ms spread of two timings
    with pytest.raises(PapmError, match="cannot be told apart from timing noise"):
        budget.fit_latency(m, scores, cfg, torch.zeros(1, 3, 32, 32))
