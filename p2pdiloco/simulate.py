"""``p2pdiloco simulate``: a coordinator and N peers as separate processes on loopback.

The peers are real ``p2pdiloco join`` processes, each in its own process group (so stopping one
stops its DHT, averager and ``p2pd`` too). Progress is read from their metrics files; at the end
the summary table, ``summary.json`` and ``loss.png`` are written to the output folder.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

from p2pdiloco.config import load_recipe, recipe_path
from p2pdiloco.errors import P2PDilocoError

# Rough CPU seconds per token of forward+backward for a parameter, used only to size the default
# timeout of a simulation; generous on purpose (2 cores shared by all peers).
_SECONDS_PER_TOKEN_PARAM = 2e-9


class ProcessGroup:
    """A child in its own session/process group; ``stop`` signals the whole group and reaps it.

    Its stdin is /dev/null: a ``join`` that sees a terminal would run the peer under a supervisor
    in yet another session (see :mod:`p2pdiloco.supervise`), out of reach of ``stop``'s SIGKILL.
    """

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.log = log_path.open("ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        self.terminated = False

    def terminate(self) -> None:
        """SIGTERM to the main process, once: a second one arriving while Python shuts down
        (its handlers already gone) would kill a peer that was leaving cleanly."""
        if self.alive() and not self.terminated:
            self.terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 15.0) -> int:
        """SIGTERM to the main process (the peer finishes its round and leaves), then SIGKILL of the
        whole group after ``grace`` seconds.

        SIGTERM goes to the main process only: signalling the group would also kill hivemind's DHT
        and averager processes and ``p2pd``, which the peer still needs to leave cleanly.
        """
        self.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self.signal(signal.SIGKILL)  # children (DHT, averager, p2pd) of an exited peer too, if any linger
        code = self.proc.wait()
        self.log.close()
        # Grandchildren are reaped by init, not by us: there is no event to wait on, so poll (bounded).
        deadline = time.monotonic() + 10
        while not self.gone() and time.monotonic() < deadline:
            time.sleep(0.05)
        return code

    def gone(self) -> bool:
        """True when no process of the group is left (the leader's pid is the group id)."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return True
        return False


def _cli() -> list[str]:
    return [sys.executable, "-m", "p2pdiloco"]


def start_coordinator(out: Path, timeout: float, *extra: str, launcher: Sequence[str] = ()) -> tuple[ProcessGroup, list[str]]:
    """Start ``p2pdiloco coordinator`` (``extra``: more of its options; ``launcher``: a command
    prefix such as ``ip netns exec NS``) and wait for its addresses."""
    addrs_file = out / "coordinator.addrs"
    addrs_file.unlink(missing_ok=True)
    coord = ProcessGroup([*launcher, *_cli(), "coordinator", "--addrs-file", str(addrs_file), *extra], out / "coordinator.log")
    deadline = time.monotonic() + timeout
    while not addrs_file.exists():
        if not coord.alive() or time.monotonic() > deadline:
            coord.stop()
            raise P2PDilocoError(f"the coordinator did not start within {timeout:.0f} s: see {out / 'coordinator.log'}")
        time.sleep(0.2)  # the coordinator writes the file atomically once its DHT is up
    return coord, addrs_file.read_text().split()


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return records


def summarize(metrics: dict[str, list[dict]], num_peers: int, wall_s: float, started_at: float | None = None) -> dict:
    """The run's summary from every peer's metrics records (see README, machine-readable output).

    ``started_at`` (a ``time.time()``) is the origin of ``val_curve``'s wall-clock seconds.

    Identical states at every epoch do not mean that every peer's work counted: when two groups
    average at one epoch, the run continues from one of their states and the members of the other
    download it, so their states end up identical while their epoch's work is lost. ``work_kept``
    makes that visible:

    - an epoch's *kept state* (row ``kept_state``) is the state the run continued from: the one held
      by the most peers at that epoch (each peer's last record at it), ties to the smallest digest,
      the rule of :func:`p2pdiloco.swarm.winning_state`;
    - its contributors (row ``contributors``) are the peers whose pseudo-gradients it holds: the
      union of the ``contributors`` (``group`` in records from before that field) of the
      ``outer_step``/``solo_step`` records at that epoch with that digest;
    - a peer *trained* in epoch ``e`` (row ``trained``) if it has an ``outer_step``, ``solo_step`` or
      ``downloaded`` record at ``e`` (it took part in that epoch; counted once however many records).
      A download counts too: the work of a peer that fell behind or lost a fork is not in ``e``'s
      state, and a joiner's first download counts as an epoch in which nothing of its work was kept;
    - a two-level round whose column owner or cell decider died keeps only part of some peers' work
      (the rest is carried into their next round): such a peer counts for its share of values in
      the state (``partly_included`` of the records), so ``kept`` is a sum of shares, not a count;
    - ``work_kept`` = Σ kept / Σ trained over the epochs (``work_kept_peer_epochs`` /
      ``peer_epochs_trained``); None when no peer trained. A contributor counts only if it trained
      at that epoch here too, so a peer whose metrics are missing cannot push the fraction past 1.
      The carried part lands one round later and is not counted: the figure is a lower bound.
      ``work_kept_whole`` counts only the peer-epochs whose work is in the state entire.
    """
    hashes: dict[int, dict[str, str]] = {}
    per_epoch: dict[int, list[dict]] = {}
    trained: dict[int, set[str]] = {}  # epoch -> the peers that took part in it
    contributed: dict[tuple[int, str], set[str]] = {}  # (epoch, digest) -> the peers whose work that state holds
    partly: dict[tuple[int, str], dict[str, float]] = {}  # (epoch, digest) -> peers with part of their work in it
    for records in metrics.values():
        for r in records:
            hashes.setdefault(r["epoch"], {})[r["peer"]] = r["state_hash"]
            per_epoch.setdefault(r["epoch"], []).append(r)
            if r.get("event") in ("outer_step", "solo_step", "downloaded"):
                trained.setdefault(r["epoch"], set()).add(r["peer"])
            if r.get("event") in ("outer_step", "solo_step"):
                who = r.get("contributors", r.get("group", [r["peer"]]))
                contributed.setdefault((r["epoch"], r["state_hash"]), set()).update(who)
                shares = partly.setdefault((r["epoch"], r["state_hash"]), {})
                for p, share in (r.get("partly_included") or {}).items():
                    shares[p] = max(shares.get(p, 0.0), min(1.0, max(0.0, float(share))))
    val = {e: [r["val_loss"] for r in rs if r.get("val_loss") is not None] for e, rs in per_epoch.items()}
    val = {e: v[0] for e, v in val.items() if v}
    completed = max((e for e, rs in per_epoch.items() if any(r.get("event") in ("outer_step", "solo_step") for r in rs)), default=0)
    rows = []
    for epoch in sorted(per_epoch):
        steps = [r for r in per_epoch[epoch] if r.get("event") in ("outer_step", "solo_step")]
        held = Counter(hashes[epoch].values())
        kept = min(held, key=lambda h: (-held[h], h))
        took_part = trained.get(epoch, set())
        whole = contributed.get((epoch, kept), set()) & took_part
        shares = partly.get((epoch, kept), {})
        rows.append(
            dict(
                epoch=epoch,
                train_loss=statistics.mean(r["train_loss"] for r in steps) if steps else None,
                val_loss=val.get(epoch),
                group_size=max((r["group_size"] for r in steps), default=0),
                allreduce_s=statistics.mean(r["allreduce_s"] for r in steps) if steps else 0.0,
                bytes_sent=sum(r["bytes_sent"] for r in steps),
                bytes_received=sum(r.get("bytes_received", 0) for r in steps),
                encode_s=sum(r.get("encode_s", 0.0) for r in steps),
                decode_s=sum(r.get("decode_s", 0.0) for r in steps),
                rounds=sum(1 for r in steps if r.get("event") == "outer_step"),
                peers_reporting=len(hashes[epoch]),
                distinct_states=len(held),
                kept_state=kept,
                contributors=len(whole),
                # peer-epochs, shares counted (a contributor's too: an undecided cell leaves part of everyone out)
                kept=sum(shares.get(p, 1.0 if p in whole else 0.0) for p in took_part),
                trained=len(took_part),
            )
        )
    sent, received = sum(r["bytes_sent"] for r in rows), sum(r["bytes_received"] for r in rows)
    # Each peer's share of time spent computing (evaluation left out), then the mean over peers.
    utilization = []
    for records in metrics.values():
        steps = [r for r in records if "compute_utilization" in r]
        busy = sum(r["wall_s"] - r.get("eval_s", 0.0) for r in steps)
        if busy > 0:
            utilization.append(sum(r["compute_s"] for r in steps) / busy)
    origin = started_at if started_at is not None else min((r["time"] for rs in metrics.values() for r in rs), default=0.0)
    val_points = sorted(
        (r["time"] - origin, r["epoch"], r["val_loss"]) for rs in metrics.values() for r in rs if r.get("val_loss") is not None
    )
    rounds = max(1, sum(r["rounds"] for r in rows))
    kept_work, peer_epochs = sum(r["kept"] for r in rows), sum(r["trained"] for r in rows)
    whole_work = sum(r["contributors"] for r in rows)
    return dict(
        peers=num_peers,
        epochs_completed=completed,
        val_loss_initial=val.get(0),
        val_loss_final=val.get(max(val)) if val else None,
        consistent=all(len(set(h.values())) == 1 for h in hashes.values()),
        state_hashes={str(e): h for e, h in sorted(hashes.items())},
        bytes_sent_total=sent,
        bytes_received_total=received,
        # per peer and round: what one volunteer's link carries each time it averages
        bytes_sent_per_round=sent / rounds,
        bytes_received_per_round=received / rounds,
        encode_s_total=sum(r["encode_s"] for r in rows),
        decode_s_total=sum(r["decode_s"] for r in rows),
        wall_s=wall_s,
        compute_utilization=statistics.mean(utilization) if utilization else None,
        # [seconds since the start, validation loss of the global parameters], one per evaluation
        val_curve=[[round(t, 3), v] for t, _, v in val_points],
        # peer-epochs whose work reached the state the run continued from, of those trained (see above)
        work_kept=kept_work / peer_epochs if peer_epochs else None,
        work_kept_peer_epochs=int(kept_work) if float(kept_work).is_integer() else round(kept_work, 2),
        peer_epochs_trained=peer_epochs,
        # the stricter count: peer-epochs whose work is in the kept state entire
        work_kept_whole=whole_work / peer_epochs if peer_epochs else None,
        whole_peer_epochs=whole_work,
        epochs=rows,
    )


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["epochs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["epoch"], r["train_loss"]) for r in rows if r["train_loss"] is not None]
    val = [(r["epoch"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
    if train:
        ax.plot(*zip(*train), "o-", label="train loss (mean over peers, inner phase)")
    if val:
        ax.plot(*zip(*val), "s-", label="validation loss (global parameters)")
    ax.set_xlabel("epoch (outer steps)")
    ax.set_ylabel("loss")
    ax.set_title(f"p2pdiloco simulate: {summary['peers']} peers")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['peers']} peers, {summary['epochs_completed']} epochs, {summary['wall_s']:.0f} s")
    # "work kept": of the peers that trained at the epoch, the contributors of the state the run kept
    for col in ("epoch", "train", "val", "group", "all-reduce s", "MB sent", "MB recv", "work kept"):
        table.add_column(col, justify="right")
    table.add_column("states", justify="right", no_wrap=True, min_width=9)  # "identical" must stay readable
    for r in summary["epochs"]:
        table.add_row(
            str(r["epoch"]),
            "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}",
            "-" if r["val_loss"] is None else f"{r['val_loss']:.3f}",
            str(r["group_size"] or "-"),
            f"{r['allreduce_s']:.2f}",
            f"{r['bytes_sent'] / 1e6:.1f}",
            f"{r['bytes_received'] / 1e6:.1f}",
            f"{_count(r['kept'])}/{r['trained']}" if r["trained"] else "-",
            "identical" if r["distinct_states"] == 1 else f"{r['distinct_states']} DIFFER",
        )
    console = Console()
    console.print(table)
    verdict = "[green]consistent[/]" if summary["consistent"] else "[red]NOT consistent[/]"
    val = " -> ".join(f"{v:.3f}" for v in (summary["val_loss_initial"], summary["val_loss_final"]) if v is not None)
    if summary["consistent"]:
        console.print(f"{verdict}: every peer held the same state at every epoch; validation loss {val or 'not evaluated'}")
    else:
        console.print(f"{verdict}: some epochs have differing states (see summary.json)")
    if summary["peer_epochs_trained"]:
        kept, trained, whole = summary["work_kept_peer_epochs"], summary["peer_epochs_trained"], summary["whole_peer_epochs"]
        lost = "" if kept == trained else "; the rest was trained into states the run did not continue from"
        if whole != kept:  # a dead owner's column: part of some peers' work, carried to their next round
            lost = f"; {whole} of them entire, the others in part (the rest carried to the next round)"
        console.print(f"work kept: {_count(kept)}/{trained} peer-epochs ({100 * summary['work_kept']:.0f} %){lost}")


def _count(peer_epochs: float) -> str:
    """A count of peer-epochs that may hold shares: whole numbers print as such."""
    return f"{peer_epochs:.0f}" if float(peer_epochs).is_integer() else f"{peer_epochs:.2f}"


def default_timeout(recipe, epochs: int, num_peers: int) -> float:
    run = recipe.run
    m = run.model
    params = m.num_layers * (4 * m.hidden_size**2 + 3 * m.hidden_size * m.intermediate_size) + m.vocab_size * m.hidden_size
    tokens = run.inner_steps * run.data.batch_size * run.data.seq_len
    step_s = tokens * params * _SECONDS_PER_TOKEN_PARAM * max(1.0, num_peers / 2)
    return 120 + epochs * (3 * step_s + run.averaging.round_s + run.averaging.grace_s)


def parse_speeds(text: str | None, num_peers: int) -> list[float] | None:
    """``--speeds 1,0.5,0.25``: one emulated speed in (0, 1] per peer."""
    if text is None:
        return None
    try:
        speeds = [float(x) for x in text.split(",")]
    except ValueError:
        raise P2PDilocoError(f"--speeds '{text}' is not a comma-separated list of numbers (e.g. 1,0.5,0.25)") from None
    if len(speeds) != num_peers:
        raise P2PDilocoError(f"--speeds gives {len(speeds)} speeds for {num_peers} peers: give one per peer")
    if not all(0 < x <= 1 for x in speeds):
        raise P2PDilocoError(f"--speeds '{text}': each speed must be in (0, 1] (a fraction of this machine's speed)")
    return speeds


def peer_args(i: int, config_file: str, epochs: int, out: Path, addrs: list[str], overrides: list[str],
              speed: float | None = None) -> list[str]:
    """The ``p2pdiloco join`` command of simulated peer ``i``; peer 0 evaluates, exports the global
    model (``out/model``) and leaves its checkpoint (``out/checkpoint``), the others skip evaluation."""
    args = [*_cli(), "join", config_file, "--max-epochs", str(epochs), "--metrics-file", str(out / f"peer{i}.jsonl")]
    for addr in addrs:
        args += ["--peers", addr]
    for item in overrides:
        args += ["--set", item]
    if speed is not None:
        args += ["--set", f"peer.emulate_speed={speed}"]
    if i == 0:
        args += ["--export", str(out / "model"), "--checkpoint-dir", str(out / "checkpoint")]
    else:
        args += ["--set", "peer.eval_every=0"]
    return args


def run_simulation(config: str | None, *, overrides: list[str], num_peers: int, epochs: int, out: Path,
                   timeout: float | None, speeds: list[float] | None = None, dashboard_port: int | None = None) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    recipe = load_recipe(config, overrides)  # fail fast on a bad config, before starting anything
    config_file = str(recipe_path(config))
    out.mkdir(parents=True, exist_ok=True)
    # An earlier run's checkpoint too: peer 0 would resume from it instead of starting this run fresh.
    for stale in [*out.glob("peer*.jsonl"), *out.glob("*.log"), out / "checkpoint" / "checkpoint.pt"]:
        stale.unlink(missing_ok=True)
    from p2pdiloco import corpus

    print(f"preparing data and tokenizer for '{recipe.run.name}' ...", flush=True)
    corpus.prepare(recipe.run.data, recipe.run.model.vocab_size, Path(recipe.peer.cache_dir).expanduser())
    timeout = timeout or default_timeout(recipe, epochs, num_peers) / min(speeds or [1.0])
    started, started_at = time.monotonic(), time.time()
    dashboard = ["--dashboard-port", str(dashboard_port)] if dashboard_port else []
    coord, addrs = start_coordinator(out, recipe.peer.bootstrap_s, *dashboard)
    if dashboard_port:
        print(f"dashboard: http://127.0.0.1:{dashboard_port}/", flush=True)
    peers: list[ProcessGroup] = []
    try:
        for i in range(num_peers):
            speed = None if speeds is None else speeds[i]
            peers.append(ProcessGroup(peer_args(i, config_file, epochs, out, addrs, overrides, speed), out / f"peer{i}.log"))
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn()) as progress:
            tasks = [progress.add_task(f"peer {i}", total=epochs, info="starting") for i in range(num_peers)]
            deadline = started + timeout
            while any(p.alive() for p in peers) and time.monotonic() < deadline:
                for i, task in enumerate(tasks):
                    records = read_metrics(out / f"peer{i}.jsonl")
                    last = records[-1] if records else None
                    info = "starting" if last is None else f"epoch {last['epoch']} {last.get('event', '')}"
                    if last and last.get("train_loss") is not None:
                        info += f" loss {last['train_loss']:.3f}"
                    if not peers[i].alive():
                        info += f" (exited {peers[i].proc.returncode})"
                    progress.update(task, completed=last["epoch"] if last else 0, info=info)
                time.sleep(1.0)  # a progress display refresh, not synchronisation
        if any(p.alive() for p in peers):
            print(f"simulate: timed out after {timeout:.0f} s; stopping the peers", file=sys.stderr)
    finally:
        codes = [p.stop() for p in peers]
        coord.stop()
    metrics = {f"peer{i}": read_metrics(out / f"peer{i}.jsonl") for i in range(num_peers)}
    summary = summarize(metrics, num_peers, time.monotonic() - started, started_at)
    summary["speeds"] = speeds
    summary["exit_codes"] = codes
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "loss.png")
    print_table(summary)
    print(f"wrote {out / 'summary.json'}, {out / 'loss.png'}, the final global model ({out / 'model'}/, its "
          f"checkpoint in {out / 'checkpoint'}/) and the peers' metrics and logs in {out}/")
    return summary
