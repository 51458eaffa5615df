"""ClientApp mods (Flower's ``Mod``: ``(msg, ctx, call_next) -> Message``): what every
handler needs but none of them is about, kept out of the handlers.

- ``compute_time`` adds ``compute_s`` (the handler's own seconds) to every reply's config,
  so the server splits a round's wall time into node compute and everything else
  (transport, queueing, process start-up).
- ``test_faults`` injects the test-only faults the run config and node config ask for:
  ``test-fail-partition``/``test-fail-round`` (``test-delay-s`` > 0: a slow node instead of a
  failing one) on simulated nodes, ``test-signal = "ROUND:SIGNAL"`` on edge boxes.

Example: ``ClientApp(mods=[compute_time, test_faults])`` (clients/app.py)
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from flwr.app import Context, Message

from clients.runconfig import RunConfig


def round_of(msg: Message) -> str:
    """The round a message belongs to: ``query.stats`` -> ``stats``, ``evaluate`` -> ``evaluate``."""
    return msg.metadata.message_type.rpartition(".")[2]


def compute_time(msg: Message, ctx: Context, call_next) -> Message:
    t0 = time.perf_counter()
    reply = call_next(msg, ctx)
    if reply.has_content() and "config" in reply.content.config_records:
        rec = reply.content.config_records["config"]
        rec["json"] = json.dumps({**json.loads(rec["json"]), "compute_s": time.perf_counter() - t0})
    return reply


def test_faults(msg: Message, ctx: Context, call_next) -> Message:
    round_name, nc = round_of(msg), ctx.node_config
    sig = str(nc.get("test-signal", ""))
    if sig.partition(":")[0] == round_name:  # edge boxes: the node's whole session
        for group in _supernode_groups():  # ours last: SIGSTOP/SIGKILL stop this process too
            os.killpg(group, getattr(signal, "SIG" + sig.partition(":")[2]))
    run = RunConfig.read(ctx.run_config)
    simulated = "partition-id" in nc and "data" not in nc
    hit = run.test_fail_partition in (int(nc.get("partition-id", -1)), -2)  # -2: every node
    if simulated and hit and round_name == run.test_fail_round:
        if run.test_delay_s <= 0:
            raise RuntimeError(f"injected failure in round {round_name} (test-fail-partition)")
        time.sleep(run.test_delay_s)
    return call_next(msg, ctx)


def _supernode_groups() -> list[int]:
    """Process groups from the SuperNode down to this ClientApp process: Flower's SuperExec
    starts its own session, so one group is not the whole node."""
    groups, pid = [], os.getpid()
    while pid > 1:
        groups.append(os.getpgid(pid))
        if b"flower-supernode" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return list(dict.fromkeys(reversed(groups)))
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return [os.getpgid(0)]  # no SuperNode above us: never signal anything else
