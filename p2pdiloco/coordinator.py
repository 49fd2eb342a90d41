"""The coordinator: a stable bootstrap address for a run, and ``status`` read from the DHT.

Training never depends on the coordinator: once peers know each other the DHT lives among them.
It only gives newcomers a fixed address (fixed port and, with ``--identity``, a fixed peer id).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path

from p2pdiloco import swarm
from p2pdiloco.swarm import devices_label
from p2pdiloco.dht import RoutingWatchdog, maddrs_of, start_dht, stop_dht
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
    dashboard: tuple[str, int, float] | None = None,
    secret=None,
) -> None:
    """Serve the DHT until SIGINT/SIGTERM, then stop it and its ``p2pd`` daemon cleanly.

    ``backup``: (recipe, folder, every_epochs) to keep a copy of that run's state (see backup.py).
    ``dashboard``: (host, port, refresh_s) to serve the web dashboard (see dashboard.py).
    ``secret``: a closed run's :class:`~p2pdiloco.auth.RunSecret`: the DHT stores and returns only
    members' records (and the dashboard can read them); needed with ``backup`` of a closed run.
    """
    stop = threading.Event()

    def on_signal(*_) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    if backup and backup[0].run.closed != (secret is not None):
        from p2pdiloco.auth import for_run

        for_run(backup[0].run.closed, secret)  # raises the one-line error that names the fix
    dht = start_dht(
        host=host, port=port, public_host=public_host, identity=str(identity) if identity else None, timeout=timeout,
        secret=secret,
    )
    if secret is not None:
        log.info("closed run: membership key id %s; records without the run's MAC are dropped", secret.key_id)
    # No initial peers to fall back on, but after a network cut it re-contacts the peers it knew.
    watchdog = RoutingWatchdog(dht, [], period_s=10.0, timeout_s=5.0)
    keeper = watch = server = None
    try:
        if backup:
            from p2pdiloco.backup import StateBackup

            recipe, folder, every = backup
            keeper = StateBackup(dht, recipe, folder, every_epochs=every, every_s=recipe.peer.heartbeat_s, secret=secret)
            log.info("keeping a backup of run '%s' in %s (every %d epoch(s))", recipe.run.name, folder, every)
            signal.signal(signal.SIGINT, on_signal)  # hivemind's averager has just set SIGINT to "ignore"
        if dashboard:
            from p2pdiloco import dashboard as board

            dash_host, dash_port, refresh_s = dashboard
            watch = board.SwarmWatch(dht, refresh_s=refresh_s).start()
            server = board.serve(watch, dash_host, dash_port)
            shown = "127.0.0.1" if dash_host in ("0.0.0.0", "") else dash_host
            print(f"dashboard: http://{shown}:{server.server_address[1]}/ (read-only; refreshes every {refresh_s:g} s)", flush=True)
        addrs = maddrs_of(dht)
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
        if server is not None:
            server.shutdown()
        if watch is not None:
            watch.stop()
        if keeper is not None:
            keeper.stop()
        watchdog.stop()
        stop_dht(dht)


def collect_status(peers: list[str], run: str | None, timeout: float, secret=None) -> dict:
    """``{run: summary}`` (see :func:`p2pdiloco.dashboard.summarize_run`) for the given run, or for
    every run the DHT lists. A closed run's records can be read only with its ``secret``."""
    from p2pdiloco.dashboard import list_runs, summarize_run

    dht = start_dht(peers, client_mode=True, timeout=timeout, secret=secret)
    try:
        runs = [run] if run else list_runs(dht, timeout)
        if runs is None:
            raise SwarmError(f"could not list the runs in the DHT within {timeout:.0f} s: try a larger --timeout")
        status = {}
        for name in runs:
            records = swarm.read_progress(dht, name, timeout, include_leaving=True)
            if records is None:
                raise SwarmError(f"could not read run '{name}' from the DHT within {timeout:.0f} s: try a larger --timeout")
            status[name] = summarize_run(name, records)
        return status
    finally:
        stop_dht(dht)


def print_status(peers: list[str], *, run: str | None, as_json: bool, timeout: float, secret=None) -> None:
    status = collect_status(peers, run, timeout, secret=secret)
    if as_json:
        print(json.dumps(status, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    from p2pdiloco.console import human_bytes

    # Not a terminal (a pipe, a file, watch): rich would assume 80 columns and cut the table.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    if not status:
        console.print("no run found in the DHT (no peer has published progress yet)")
    for name, s in status.items():
        last = s["last_round"]
        facts = [f"epoch {s['epoch'] if s['epoch'] is not None else '-'}", f"{s['peers_online']} peer(s) online",
                 f"{s['tokens_per_s']:.0f} tokens/s"]
        if s["val_loss"] is not None:
            facts.append(f"val loss {s['val_loss']:.3f} at epoch {s['val_epoch']}")
        if last:
            contributing = f", {last['contributors']} contributing" if last["contributors"] else ""  # 0: older peers do not say
            facts.append(f"last round: epoch {last['epoch']}, {last['group_size']} peers{contributing}, {last['allreduce_s']:.2f} s, "
                         f"{human_bytes(last['bytes_sent'])} sent")
        table = Table(title=f"run {name}: " + "; ".join(facts))
        for col in ("peer", "state", "devices", "epoch", "tokens/s", "train loss", "val loss", "group", "contrib.", "all-reduce s", "sent",
                    "digest", "seen"):
            table.add_column(col, justify="left" if col in ("peer", "state", "digest") else "right")
        for r in s["peers"]:
            table.add_row(
                r["peer"][-12:],
                r["role"],
                devices_label(r.get("devices") or []),
                str(r["epoch"]),
                f"{r['tokens_per_s']:.0f}",
                "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}",
                "-" if r["val_loss"] is None else f"{r['val_loss']:.3f}",
                str(r["group_size"] or "-"),
                str(r["contributors"] or "-"),
                "-" if r["allreduce_s"] is None else f"{r['allreduce_s']:.2f}",
                human_bytes(r["bytes_sent_total"]),
                r["state_hash"][:8],
                f"{r['last_seen_s']:.0f}s ago",
            )
        console.print(table)

