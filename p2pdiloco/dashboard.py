"""What the swarm is doing, for people: the coordinator's web dashboard and ``p2pdiloco status``.

Everything comes from the progress records peers publish in the DHT (see :mod:`p2pdiloco.swarm`).
The DHT holds only the present (each peer's latest record), so :class:`SwarmWatch` polls it every
``refresh_s`` seconds and keeps the history the charts need: validation loss by epoch (each
record says which epoch's global parameters its ``val_loss`` was measured on), the swarm's
throughput over time, and each round's all-reduce time, bytes, group size and contributors (the
members whose pseudo-gradients reached the average; each record carries its peer's last rounds). A dashboard started late shows the history from its start on.

The page is read-only (GET only), bound to loopback unless told otherwise, and treats every value
as a stranger's: records are validated by pydantic before they get here, and the page writes them
with ``textContent``, never as HTML.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from p2pdiloco import swarm

log = logging.getLogger("p2pdiloco")

HISTORY = 5000  # points kept per chart: at one poll every 5 s, about 7 hours of throughput


def list_runs(dht, timeout: float) -> list[str] | None:
    """The run names the DHT knows (None if it could not be read in time)."""
    try:
        found = dht.get(swarm.RUNS_KEY, latest=True, return_future=True).result(timeout=timeout)
    except Exception as e:
        log.debug("could not list the runs: %r", e)
        return None
    if found is None or not isinstance(found.value, dict):
        return []
    return sorted(str(k) for k in found.value if isinstance(k, str) and len(k) <= 128)


def summarize_run(name: str, records: dict[str, swarm.Progress], now: float | None = None) -> dict:
    """The facts of one run at one moment, from its live records (``status`` prints these)."""
    now = time.time() if now is None else now
    training = [r for r in records.values() if not r.backup and not r.leaving]
    last = max((r.rounds[-1].epoch for r in training if r.rounds), default=None)
    in_last = [s for r in training for s in r.rounds if s.epoch == last]
    vals = [r for r in records.values() if r.val_loss is not None and r.val_epoch is not None]
    newest_val = max(vals, key=lambda r: r.val_epoch, default=None)
    return dict(
        run=name,
        epoch=max((r.epoch for r in training), default=None),
        peers_online=len(training),
        tokens_per_s=sum(r.tokens_per_s for r in training),
        val_loss=None if newest_val is None else newest_val.val_loss,
        val_epoch=None if newest_val is None else newest_val.val_epoch,
        last_round=None if last is None else dict(
            epoch=last,
            group_size=max(s.group_size for s in in_last),
            contributors=max(s.contributors for s in in_last),  # 0: the peers do not say (older versions)
            allreduce_s=statistics.median(s.allreduce_s for s in in_last),
            bytes_sent=sum(s.bytes_sent for s in in_last),
            reports=len(in_last),
        ),
        peers=[_peer_row(r, now) for r in sorted(records.values(), key=lambda r: (r.backup, -r.epoch, r.peer))],
    )


def _peer_row(r: swarm.Progress, now: float) -> dict:
    row = r.model_dump(exclude={"rounds"})
    last = r.rounds[-1] if r.rounds else None
    row.update(last_seen_s=round(max(0.0, now - r.time), 1), role=_role(r),
               group_size=last.group_size if last else None, contributors=last.contributors if last else None,
               allreduce_s=last.allreduce_s if last else None)
    return row


def _role(r: swarm.Progress) -> str:
    if r.backup:
        return "backup"
    if r.leaving:
        return "leaving"
    return "ready" if r.ready else "training"


class SwarmWatch:
    """Polls the DHT every ``refresh_s`` seconds (each read bounded by ``request_s``) and keeps each
    run's history. ``run``: watch only this run (default: every run the DHT lists)."""

    def __init__(self, dht, *, run: str | None = None, refresh_s: float = 5.0, request_s: float = 5.0):
        self.dht, self.run, self.refresh_s, self.request_s = dht, run, refresh_s, request_s
        self.lock = threading.Lock()
        self.runs: dict[str, dict] = {}  # name -> {"now": summary, "val": {...}, "throughput": deque, "rounds": {...}}
        self.polled_at: float | None = None
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> "SwarmWatch":
        self.thread = threading.Thread(target=self._loop, name="swarm-watch", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=2 * self.request_s + self.refresh_s)

    def _loop(self) -> None:
        while True:
            try:
                self.poll()
            except Exception as e:  # a busy or restarting DHT: the next poll tries again
                log.debug("dashboard poll: %r", e)
            if self.stopped.wait(self.refresh_s):
                return

    def poll(self) -> None:
        """One look at the DHT: the runs' records, folded into the history."""
        names = [self.run] if self.run else list_runs(self.dht, self.request_s)
        if names is None:
            return
        now = time.time()
        for name in names:
            records = swarm.read_progress(self.dht, name, timeout=self.request_s, include_leaving=True)
            if records is not None:
                self._fold(name, records, now)
        with self.lock:
            self.polled_at = now

    def _fold(self, name: str, records: dict[str, swarm.Progress], now: float) -> None:
        summary = summarize_run(name, records, now)
        with self.lock:
            run = self.runs.get(name)
            if run is not None and summary["epoch"] is not None and summary["epoch"] < run["top"]:
                # The swarm is back below an epoch it reached: the run was started again under the
                # same name (its state did not survive). Its history must not be mixed with this one.
                log.info("dashboard: run '%s' restarted at epoch %d (it had reached %d)", name, summary["epoch"], run["top"])
                run = None
            if run is None:
                run = self.runs[name] = dict(val={}, throughput=deque(maxlen=HISTORY), rounds={}, top=0, since=now)
            run["now"] = summary
            run["top"] = max(run["top"], summary["epoch"] or 0)
            run["throughput"].append((now, summary["tokens_per_s"], summary["peers_online"]))
            for r in records.values():
                if r.val_loss is not None and r.val_epoch is not None and r.val_epoch not in run["val"]:
                    run["val"][r.val_epoch] = (r.time, r.val_loss)  # every peer measures the same parameters
                for stat in [] if r.backup else r.rounds:
                    run["rounds"].setdefault(stat.epoch, {})[r.peer] = (stat.allreduce_s, stat.bytes_sent, stat.group_size,
                                                                        stat.contributors)
            for table in (run["val"], run["rounds"]):
                while len(table) > HISTORY:
                    del table[min(table)]

    def snapshot(self) -> dict:
        """Everything the page shows, as plain JSON-able values."""
        with self.lock:
            runs = []
            for name, run in sorted(self.runs.items()):
                rounds = []
                for epoch, by_peer in sorted(run["rounds"].items()):
                    seconds, sent, groups, contributors = zip(*by_peer.values())
                    rounds.append(dict(epoch=epoch, allreduce_s=statistics.median(seconds), bytes_sent=sum(sent),
                                       group_size=max(groups), contributors=max(contributors), reports=len(by_peer)))
                runs.append(dict(
                    run["now"],
                    history_since=run["since"],
                    val_curve=[dict(epoch=e, time=t, val_loss=v) for e, (t, v) in sorted(run["val"].items())],
                    throughput=[dict(time=t, tokens_per_s=x, peers=n) for t, x, n in run["throughput"]],
                    rounds=rounds,
                ))
            return dict(polled_at=self.polled_at, refresh_s=self.refresh_s, runs=runs)


def page() -> bytes:
    return resources.files("p2pdiloco").joinpath("dashboard.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    watch: SwarmWatch  # set on the subclass made by serve()
    server_version = "p2pdiloco-dashboard"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(page(), "text/html; charset=utf-8")
        elif path == "/api/state":
            self._send(json.dumps(self.watch.snapshot()).encode(), "application/json")
        else:
            self.send_error(HTTPStatus.NOT_FOUND)

    def do_HEAD(self) -> None:  # noqa: N802
        self.send_response(HTTPStatus.OK)
        self.end_headers()

    def _read_only(self) -> None:
        self.send_error(HTTPStatus.METHOD_NOT_ALLOWED, "the dashboard is read-only")

    do_POST = do_PUT = do_DELETE = do_PATCH = _read_only

    def _send(self, body: bytes, kind: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # The page loads nothing from elsewhere (the machines it runs on may have no internet).
        self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:  # requests are not worth the coordinator's log
        log.debug("dashboard: " + fmt, *args)


def serve(watch: SwarmWatch, host: str, port: int) -> ThreadingHTTPServer:
    """Serve the dashboard from a thread; returns the server (``shutdown()`` stops it)."""
    from p2pdiloco.errors import SwarmError

    handler = type("Handler", (_Handler,), {"watch": watch})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise SwarmError(f"the dashboard cannot listen on {host}:{port} ({e.strerror}): choose another --dashboard-port") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="dashboard", daemon=True).start()
    return server
