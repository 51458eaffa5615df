"""The Flower run config (``[tool.flwr.app.config]`` in pyproject.toml) read once into a
typed object, by the ServerApp and the ClientApp alike: every key, its type and default in
one place (a test keeps it equal to pyproject.toml). Flower's dashes become underscores.

Example: ``python -c "from clients.runconfig import RunConfig; print(RunConfig.read({'devices': 3}))"``
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from papm_core.util import PapmError


@dataclass(frozen=True)
class RunConfig:
    out: str = ""                  # run folder (absolute); "" = ~/papm-runs/<preset> (ServerApp)
    devices: int = 2               # N, the number of device groups (= SuperNodes)
    config: str = ""               # resolved config JSON written by sim.py; "" = the preset below
    preset: str = "auto"
    base: str = ""                 # base checkpoint; "" = train one into <out>/base.pt
    data: str = ""                 # data source; "" = $PAPM_DATA or torchvision's download
    store: str = ""                # simulated nodes' store; boxes set `store` in their node config
    client_threads: int = 0        # torch threads per simulated client; 0 = torch's default
    train_threads: int = 0         # torch threads while a simulated client fine-tunes; 0 = client_threads
    deal_seed: int = 0             # how classes are dealt to nodes before grouping
    holdings: str = "group"        # simulated nodes' data (papm_core.holdings)
    budgets: str = ""              # per-device budgets, cycled (sim.budgets): "0.5, 1.2MB, 2.5ms"
    fleet_budget: str = ""         # "1.0x": devices' parameters sum to that multiple of the base's
    git_commit: str = ""           # the launcher's commit (the app itself runs from a FAB copy)
    engine: str = "simulation"     # how the nodes run, as written in the report
    test_fail_partition: int = -1  # test only: this simulated node (-2: every node) fails ...
    test_fail_round: str = ""      # ... in this round
    test_delay_s: float = 0.0      # test only: > 0 makes that node sleep this long instead

    @classmethod
    def read(cls, rc: Mapping[str, Any]) -> "RunConfig":
        """From Flower's run config (or any mapping with its dashed keys); an unknown key or a
        value of the wrong type is one line naming the key."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(rc) - set(known))
        if unknown:
            raise PapmError(f"unknown run-config keys {unknown}; known: {', '.join(known)}")
        kw = {}
        for key, value in rc.items():
            f = known[key]
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            try:
                kw[f.name] = kind(value)
            except (TypeError, ValueError):
                raise PapmError(f"run-config key {key} = {value!r}: expected {kind.__name__}") from None
        return cls(**kw)

    @property
    def by_flwr(self) -> bool:
        """A plain ``flwr run .`` (sim.py always passes the resolved ``config``)."""
        return not self.config

    @property
    def simulated(self) -> bool:
        return self.engine.startswith("simulation")
