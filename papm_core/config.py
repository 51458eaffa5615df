"""Typed configs: defaults live in dataclasses, presets in ``configs/*.toml``.

A preset file has one table per stage (``[train]``, ``[prune]``, ``[fuse]``, ``[sim]``); any key may be
overridden on the command line. Unknown keys are an error, so a typo never passes
silently. ``auto`` picks ``full`` when CUDA is present and ``quick`` otherwise.

Example: ``python -c "from papm_core.config import load_preset; print(load_preset('quick'))"``
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import holdings
from .util import PRECISIONS, PapmError, write_json

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


def _check(cfg, checks: list[tuple[bool, str]]):
    """Raise the first failed check's one-line message; else return ``cfg``."""
    for ok, msg in checks:
        if not ok:
            raise PapmError(msg)
    return cfg


@dataclass
class TrainConfig:
    """The base-model recipe: SGD+Nesterov, one-cycle LR, label smoothing, weight decay."""

    data: str | None = None          # path or None for $PAPM_DATA / CIFAR-10 download
    width: float = 1.0               # channel multiplier of ResNet18 (1.0 = 11.17M params)
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1                  # peak learning rate of the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4       # applied to conv/linear weights, not BN or biases
    label_smoothing: float = 0.1
    warmup: float = 0.2              # fraction of steps spent ramping the LR up (linear)
    val_size: int = 5000             # images carved from train for model selection
    per_class: int = 0               # >0 keeps only that many train images per class
    classes: list[int] = field(default_factory=list)  # non-empty: train on these classes only
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"          # auto | bf16 | fp32 (autocast of the training loop)
    out: str = "checkpoints/base.pt"

    def validate(self) -> "TrainConfig":
        checks = [(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
                  (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
                  (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
                  (self.lr > 0, f"--lr must be positive, got {self.lr}"),
                  (self.width > 0, f"--width must be positive, got {self.width}"),
                  (self.val_size >= 1, f"--val-size must be >= 1, got {self.val_size}"),
                  (0 <= self.label_smoothing < 1, "--label-smoothing must lie in [0, 1)"),
                  (0 <= self.warmup < 1, "--warmup must lie in [0, 1)"),
                  (self.per_class >= 0, "--per-class must be >= 0")]
        return _check(self, checks)


SCOPES = ("shard", "shard+public", "all")
AUGMENTS = ("crop+flip", "flip")
RUNTIMES = ("torch", "onnxruntime", "onnxruntime-int8")  # what a device model runs in
CRITERIA = ("papm", "random")  # channel scores (papm_core.prune.CRITERIA; a test keeps them equal)


@dataclass
class PruneConfig:
    """PAPM pruning of the base model for one device's classes, then fine-tuning."""

    data: str | None = None
    classes: list[int] = field(default_factory=list)  # the device's global class ids
    params_reduction: float = 0.77   # target 1 - P/P0; met within [r, r + 0.005]
    target_size_mb: float | None = None  # alternative target: saved file <= this (MB = 2**20 B)
    target_latency_ms: float | None = None  # alternative target: batch-1 ms here, in `runtime`
    runtime: str = "torch"           # what the device runs: torch | onnxruntime | onnxruntime-int8
    alpha: float = 0.5               # weight of the normalised L2 term (1 - alpha: 1 - APoZ)
    criterion: str = "papm"          # papm | random (a baseline for benchmarks)
    search: str = "auto"             # auto (exact budget) | channel-rank (original rule) | threshold
    threshold: float | None = None   # fixed APoZ threshold for search = threshold
    min_channels: int = 8
    round_to: int = 1
    calib_size: int = 1024           # training images of the device's classes for APoZ
    scope: str = "shard+public"      # fine-tuning data: shard | shard+public | all
    recipe: str = "papm"             # papm | original (only with scope = all)
    epochs: int = 20
    min_steps: int = 0               # at least this many optimizer steps (more epochs on small shards)
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.2
    label_smoothing: float = 0.0
    kd_temperature: float = 4.0      # softens base-model targets for distillation
    augment: str = "crop+flip"       # crop+flip (live teacher) | flip (teacher logits precomputed)
    ce_weight: float = 1.0           # weight of shard cross-entropy next to distillation
    ref_size: int = 5000             # public reference set carved from train (server-held)
    node_val: float = 0.1            # share of the devices' private images each holds out for its
                                     # own epoch selection and the grouping statistics
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"          # auto | bf16 | fp32 (autocast of the fine-tuning loop)
    out_dir: str = "checkpoints"

    def validate(self) -> "PruneConfig":
        checks = [(0 < self.params_reduction < 1, f"--params-reduction must lie in (0, 1), "
                                                  f"got {self.params_reduction}"),
                  (0 <= self.alpha <= 1, f"--alpha must lie in [0, 1], got {self.alpha}"),
                  (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
                  (self.augment in AUGMENTS, f"--augment must be one of {', '.join(AUGMENTS)}"),
                  (self.scope in SCOPES, f"--scope must be one of {', '.join(SCOPES)}"),
                  (self.recipe in ("papm", "original"), "--recipe must be papm or original"),
                  (self.recipe == "papm" or self.scope == "all",
                   "--recipe original reads other devices' classes: use it with --scope all"),
                  (self.search in ("auto", "channel-rank", "threshold"),
                   "--search must be auto, channel-rank or threshold"),
                  (self.search != "threshold" or self.threshold is not None,
                   "--search threshold needs --threshold T"),
                  (self.criterion in CRITERIA, f"--criterion must be one of {', '.join(CRITERIA)}"),
                  (self.epochs >= 0, "--epochs must be >= 0"),
                  (self.min_steps >= 0, f"--min-steps must be >= 0, got {self.min_steps}"),
                  (self.ce_weight >= 0, "--ce-weight must be >= 0"),
                  (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
                  (self.min_channels >= 1 and self.round_to >= 1, "--min-channels and --round-to must be >= 1"),
                  (self.calib_size >= 1, "--calib-size must be >= 1"),
                  (0 < self.node_val < 0.5, f"prune.node_val must lie in (0, 0.5), got {self.node_val}"),
                  (self.target_size_mb is None or self.target_size_mb > 0, "--target-size-mb must be positive"),
                  (self.target_latency_ms is None or self.target_latency_ms > 0,
                   "--target-latency-ms must be positive"),
                  (self.target_size_mb is None or self.target_latency_ms is None,
                   "give one budget: --target-size-mb or --target-latency-ms, not both"),
                  (self.runtime in RUNTIMES, f"--runtime must be one of {', '.join(RUNTIMES)}"),
                  (len(self.classes) == len(set(self.classes)), f"duplicate class ids in {self.classes}"),
                  (bool(self.classes), "--classes is required: the device's class ids")]
        return _check(self, checks)


PRIORS = ("owner", "none")


@dataclass
class FuseConfig:
    """The fusion head: Adam on reference embeddings, early stopping on validation."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 5e-4
    patience: int = 20               # epochs without a better validation accuracy
    device_dropout: float = 0.2      # chance of masking each device per training sample
    hidden: int = 512
    dropout: float = 0.3
    head_seeds: int = 3              # heads trained per run; validation picks one
    prior: str = "owner"             # owner: MLP + each class scored by its own devices | none: MLP only
    min_gain_z: float = 1.645        # with the prior: keep the trained MLP only if its validation gain
                                     # is this significant (paired z; 1.645 = one-sided 5 %, 0 = any gain)

    def validate(self) -> "FuseConfig":
        checks = [(self.epochs >= 1 and self.patience >= 1, "--epochs and --patience of the fusion head must be >= 1"),
                  (self.batch_size >= 2, "--batch-size of the fusion head must be >= 2 (BatchNorm)"),
                  (self.lr > 0, "--lr of the fusion head must be positive"),
                  (0 <= self.device_dropout < 1, "--device-dropout must lie in [0, 1)"),
                  (0 <= self.dropout < 1, "--dropout of the fusion head must lie in [0, 1)"),
                  (self.head_seeds >= 1, "--head-seeds must be >= 1"),
                  (self.min_gain_z >= 0, f"--min-gain-z must be >= 0, got {self.min_gain_z}"),
                  (self.prior in PRIORS, f"--prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")]
        return _check(self, checks)


@dataclass
class SimConfig:
    """The federation: device counts, round timeouts (s), node resources."""

    devices: str = "2-10"            # a range (2-10) or a list (2,5,10)
    grouping: str = "correlation"    # similarity behind the grouping (see papm_core.grouping)
    max_group_size: int = 0          # >0 rebalances larger groups
    stats_timeout: float = 600.0
    prune_timeout: float = 7200.0
    embed_timeout: float = 1200.0
    evaluate_timeout: float = 1200.0
    latency_runs: int = 200          # batch-1 runs per latency median (at least 200)
    client_cpus: float = 0.0         # CPUs per simulated client; 0 = all (clients run one at a time)
    deal_seed: int = 0               # how classes are dealt to nodes before grouping
    holdings: str = "group"          # simulated nodes' data: group, dirichlet:A, classes:K
    budgets: str = ""                # per-device budgets cycled in device order: "0.5, 1.2MB, 2.5ms"
    fleet_budget: str = ""           # "1.0x": the devices' parameters sum to 1.0 x the base's
    test_per_class: int = 0          # >0 reports on a seeded subset of the test split (smoke runs)

    def validate(self) -> "SimConfig":
        checks = [(min(self.stats_timeout, self.prune_timeout, self.embed_timeout,
                       self.evaluate_timeout) > 0, "round timeouts must be positive"),
                  (self.latency_runs >= 200, "latency_runs must be >= 200"),
                  (self.client_cpus >= 0, "client_cpus must be >= 0"),
                  (self.max_group_size >= 0, "max_group_size must be >= 0")]
        holdings.parse(self.holdings)  # a malformed spec is its own one line
        from . import budget  # budget.py builds on PruneConfig

        budget.parse_list(self.budgets, "sim.budgets")
        if self.fleet_budget.strip():
            budget.parse(self.fleet_budget, "sim.fleet_budget", fleet=True)
        checks.append((not (self.budgets.strip() and self.fleet_budget.strip()),
                       "set sim.budgets or sim.fleet_budget, not both"))
        return _check(self, checks)


STAGES = {"train": TrainConfig, "prune": PruneConfig, "fuse": FuseConfig, "sim": SimConfig}


def resolve_preset_name(name: str) -> str:
    if name == "auto":
        return "full" if torch.cuda.is_available() else "quick"
    return name


def preset_label(name: str) -> str:
    """The name a run folder takes from a preset: ``auto`` resolved, a file's stem."""
    return Path(name).stem if name.endswith(".toml") else resolve_preset_name(name)


def preset_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".toml":
        if not p.is_file():
            raise PapmError(f"preset file {p} does not exist")
        return p
    p = PRESET_DIR / f"{resolve_preset_name(name)}.toml"
    if not p.is_file():
        known = sorted(f.stem for f in PRESET_DIR.glob("*.toml"))
        raise PapmError(f"unknown preset '{name}'; choose auto, {', '.join(known)} or a .toml file")
    return p


def make_config(cls, values: dict[str, Any], where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise PapmError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    # a text setting given as a number (--set sim.budgets=0.5, or TOML budgets = 0.5) is its text
    values = {k: str(v) if names[k].type == "str" and type(v) in (int, float) else v for k, v in values.items()}
    return cls(**values)


def _named_by_origin(e: PapmError, stage: str, from_file: set, origins: dict[str, str], path: Path) -> PapmError:
    """``e`` with each ``--flag`` it names replaced by where that key's value came from:
    ``--set prune.alpha`` (or whatever ``origins`` says), or the preset file's key."""
    def where(m: re.Match) -> str:
        key = m.group(1).replace("-", "_")
        if key in origins:
            return origins[key]
        return f"{key} in [{stage}] of {path}" if key in from_file else m.group(0)
    return PapmError(re.sub(r"--([a-z][a-z0-9-]*)", where, str(e)))


def load_preset(name: str, stage: str = "train", origins: dict[str, str] | None = None, **overrides: Any):
    """The stage's config from a preset, with non-None ``overrides`` applied on top. A bad
    value's error names where it came from: ``origins[key]`` (e.g. ``--set prune.alpha``),
    else the preset file's key, else the command-line flag."""
    path = preset_path(name)
    try:
        tables = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise PapmError(f"preset {path} is not valid TOML: {e}") from e
    unknown = sorted(set(tables) - set(STAGES))
    if unknown:
        raise PapmError(f"unknown table(s) {unknown} in {path}; valid: {sorted(STAGES)}")
    values = dict(tables.get(stage, {}))
    given = {k: v for k, v in overrides.items() if v is not None}
    from_file = set(values) - set(given)
    values.update(given)
    cfg = make_config(STAGES[stage], values, f"[{stage}] of {path}")
    try:
        return cfg.validate()
    except PapmError as e:
        raise _named_by_origin(e, stage, from_file, {k: o for k, o in (origins or {}).items() if k in given},
                               path) from None


def load_all(name: str, overrides: dict[str, dict[str, Any]] | None = None,
             origins: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Every stage's config of a preset as typed dataclasses, overrides applied per stage
    (``origins``: per stage, where each override came from, for error messages)."""
    overrides, origins = overrides or {}, origins or {}
    out = {}
    for stage in STAGES:
        extra = {"classes": [0]} if stage == "prune" else {}  # the grouping gives a device's classes
        out[stage] = load_preset(name, stage, origins.get(stage), **{**extra, **overrides.get(stage, {})})
    return out


def from_dict(stage: str, values: dict[str, Any]):
    """A stage's dataclass from a plain dict (e.g. a message or a resolved config file)."""
    return make_config(STAGES[stage], dict(values), f"the [{stage}] settings").validate()


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# keys that say which work to do, not how: a run folder holds results of any device counts;
# a round timeout only decides whether a result is complete (an incomplete one is redone)
_NOT_SETTINGS = {("sim", "devices"), ("prune", "classes"), ("sim", "stats_timeout"), ("sim", "prune_timeout"),
                 ("sim", "embed_timeout"), ("sim", "evaluate_timeout")}


def settings_diff(a: dict, b: dict) -> list[str]:
    """The ``stage.key`` names in which two resolved configs (``to_dict`` per stage, plus
    the data fingerprint) differ, apart from the device counts and a device's classes."""
    out = []
    for stage in sorted(set(a) | set(b)):
        x, y = a.get(stage, {}), b.get(stage, {})
        for key in sorted(set(x) | set(y)):
            if (stage, key) not in _NOT_SETTINGS and x.get(key) != y.get(key):
                out.append(f"{stage}.{key}")
    return out


def same_settings(a: dict, b: dict) -> bool:
    """Two resolved configs describe the same results: every setting and the data."""
    return not settings_diff(a, b)


def claim_folder(out: Path, cfg: dict, force: bool = False, fix: str = "use another --out, or --force to redo "
                 "it with these") -> None:
    """Write the resolved config ``cfg`` to ``out/config.json``; refuse (one line ending in
    ``fix``) a folder that holds a run with other settings or other data, naming what differs."""
    path = Path(out) / "config.json"
    if path.is_file() and not force:
        diff = settings_diff(json.loads(path.read_text()), cfg)
        if diff:
            raise PapmError(f"{out} holds a run with other {', '.join(diff[:4])}; {fix}")
    write_json(path, cfg)
