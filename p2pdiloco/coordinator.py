"""The coordinator: a stable bootstrap address for a run, and ``status`` read from the DHT.

Training never depends on the coordinator: once peers know each other the DHT lives among them.
It only gives newcomers a fixed address (fixed port and, with ``--identity``, a fixed peer id).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

from p2pdiloco import swarm
from p2pdiloco.errors import SwarmError

log = logging.getLogger("p2pdiloco")


def run_coordinator(
    *,
    host: str,
    port: int,
    public_host: str | None,
    identity: Path | None,
    addrs_file: Path | None,
    timeout: float,
    backup: tuple | None = None,
) -> None:
    """``backup``: (recipe, folder, every_epochs) to keep a copy of that run's state (see backup.py)."""
    """Serve the DHT until SIGINT/SIGTERM, then stop it and its ``p2pd`` daemon cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    dht = swarm.start_dht(
        host=host, port=port, public_host=public_host, identity=str(identity) if identity else None, timeout=timeout
    )
    # No initial peers to fall back on, but after a network cut it re-contacts the peers it knew.
    watchdog = swarm.RoutingWatchdog(dht, [], period_s=10.0, timeout_s=5.0)
    keeper = None
    try:
        if backup:
            from p2pdiloco.backup import StateBackup

            recipe, folder, every = backup
            keeper = StateBackup(dht, recipe, folder, every_epochs=every, every_s=recipe.peer.heartbeat_s)
            log.info("keeping a backup of run '%s' in %s (every %d epoch(s))", recipe.run.name, folder, every)
        addrs = swarm.maddrs_of(dht)
        print("coordinator is up; peers join with:", flush=True)
        for addr in addrs:
            print(f"  --peers {addr}", flush=True)
        if addrs_file:
            tmp = addrs_file.with_suffix(addrs_file.suffix + ".tmp")
            tmp.write_text("".join(a + "\n" for a in addrs))
            tmp.replace(addrs_file)  # atomic: a reader never sees a half-written file
        stop.wait()
        print("coordinator: stopping", flush=True)
    finally:
        if keeper is not None:
            keeper.stop()
        watchdog.stop()
        swarm.stop_dht(dht)


def collect_status(peers: list[str], run: str | None, timeout: float) -> dict:
    """``{run: [progress records]}`` for the given run, or for every run the DHT lists."""
    dht = swarm.start_dht(peers, client_mode=True, timeout=timeout)
    try:
        if run:
            runs = [run]
        else:
            found = dht.get(swarm.RUNS_KEY, latest=True, return_future=True).result(timeout=timeout)
            runs = sorted(str(k) for k in found.value) if found is not None and isinstance(found.value, dict) else []
        status = {}
        for name in runs:
            records = swarm.read_progress(dht, name, timeout)
            if records is None:
                raise SwarmError(f"could not read run '{name}' from the DHT within {timeout:.0f} s: try a larger --timeout")
            status[name] = [r.model_dump() for r in records.values()]
        return status
    finally:
        swarm.stop_dht(dht)


def print_status(peers: list[str], *, run: str | None, as_json: bool, timeout: float) -> None:
    status = collect_status(peers, run, timeout)
    if as_json:
        print(json.dumps(status, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not status:
        console.print("no run found in the DHT (no peer has published progress yet)")
    now = time.time()
    for name, records in status.items():
        table = Table(title=f"run {name}: {len(records)} peer(s)")
        for col in ("peer", "epoch", "tokens/s", "train loss", "val loss", "shard", "state", "seen"):
            table.add_column(col)
        for r in sorted(records, key=lambda r: (-r["epoch"], r["peer"])):
            table.add_row(
                r["peer"][-12:],
                str(r["epoch"]),
                f"{r['tokens_per_s']:.0f}",
                "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}",
                "-" if r["val_loss"] is None else f"{r['val_loss']:.3f}",
                str(r["shard"]),
                r["state_hash"][:8] + (" ready" if r.get("ready") else ""),
                f"{max(0.0, now - r['time']):.0f}s ago",
            )
        console.print(table)
