"""Training on a small slice of the real data: it learns, and it is deterministic."""

from __future__ import annotations

import pytest
import torch

from papm_core import checkpoint
from papm_core.config import load_preset
from papm_core.train import train


def _cfg(shared_archive, tmp_path, **kw):
    base = dict(data=str(shared_archive), classes=[0, 6], per_class=500, val_size=100,
                width=0.25, epochs=3, batch_size=64, lr=0.1, device="cpu",
                out=str(tmp_path / "m.pt"))
    base.update(kw)
    return load_preset("quick", "train", **base)


@pytest.mark.slow
def test_two_classes_learn_above_chance(shared_archive, cifar, tmp_path):
    """airplane vs frog, 900 train images, 3 epochs on CPU."""
    res = train(_cfg(shared_archive, tmp_path), show_progress=False, log=lambda *_: None)
    # measured 88.0 / 84.0 / 82.0% on the 100 validation images with seeds 0 / 1 / 2
    # (chance is 50%); the bound leaves a margin of 12 points below the worst seed
    assert res.best_val >= 70.0, res.history
    model, meta = checkpoint.load(res.path)
    assert meta["classes"] == [0, 6] and meta["class_names"] == ["airplane", "frog"]
    assert meta["metrics"]["complete"] and meta["metrics"]["val_acc"] == res.best_val
    assert meta["config"]["seed"] == 0 and meta["provenance"]["git_commit"]


def test_same_seed_same_weights(shared_archive, cifar, tmp_path):
    kw = dict(per_class=60, epochs=1, val_size=20, width=0.125)
    a = train(_cfg(shared_archive, tmp_path / "a", **kw), show_progress=False, log=lambda *_: None)
    b = train(_cfg(shared_archive, tmp_path / "b", **kw), show_progress=False, log=lambda *_: None)
    c = train(_cfg(shared_archive, tmp_path / "c", seed=1, **kw), show_progress=False,
              log=lambda *_: None)
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_precision_choice():
    from papm_core.util import PapmError, use_bf16

    cpu = torch.device("cpu")
    assert not use_bf16(cpu, "fp32") and use_bf16(cpu, "bf16")
    assert use_bf16(torch.device("cuda"), "auto") and not use_bf16(torch.device("cuda"), "fp32")
    native = any(getattr(torch.cpu, f, lambda: False)()
                 for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    assert use_bf16(cpu, "auto") == native  # bf16 only where the CPU has it natively
    with pytest.raises(PapmError, match="--precision must be one of"):
        load_preset("quick", "train", precision="fp16").validate()


@pytest.mark.parametrize("amx, avx512_bf16, expect", [
    (True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")])
def test_auto_precision_follows_native_bf16(monkeypatch, amx, avx512_bf16, expect):
    """``auto`` is bf16 on AMX and on AVX512-BF16 CPUs, fp32 elsewhere, and says why."""
    from papm_core.util import precision_line, resolve_precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    name, why = resolve_precision(torch.device("cpu"), "auto")
    assert name == expect
    native = {(True, False): "(AMX)", (False, True): "(AVX512-BF16)"}.get((amx, avx512_bf16), "no native bf16")
    assert native in why
    assert precision_line(torch.device("cpu"), "fp32") == "precision fp32 (asked for)"


def test_precision_is_deterministic_and_takes_effect(shared_archive, cifar, tmp_path):
    """Each precision repeats itself exactly; bf16 and fp32 give different weights."""
    kw = dict(per_class=60, epochs=1, val_size=20, width=0.125)
    runs = {name: train(_cfg(shared_archive, tmp_path / name, precision=p, **kw), show_progress=False,
                        log=lambda *_: None).model.state_dict()
            for name, p in (("bf", "bf16"), ("bf2", "bf16"), ("fp", "fp32"))}
    assert all(torch.equal(runs["bf"][k], runs["bf2"][k]) for k in runs["bf"])
    assert not all(torch.equal(runs["bf"][k], runs["fp"][k]) for k in runs["bf"])
