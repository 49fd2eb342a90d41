"""Scaling efficiency (issue 19, item 6): swarm tokens/s with N real peers over N x one peer's tokens/s.

    nice -n 19 .venv/bin/python bench/scaling.py                    # N = 1, 2, 4, 8; groups and two_level: ~7 min on 2 cores
    .venv/bin/python bench/scaling.py --peers 2 4 --protocol two_level   # a subset (N = 1, the baseline, always runs)
    .venv/bin/python bench/scaling.py --emulate-speed 1             # the raw CPU-bound figure (no emulated slowness)

What it runs. ``p2pdiloco simulate`` (:func:`p2pdiloco.simulate.run_simulation`: a coordinator and
N real ``p2pdiloco join`` peers, each a process with its DHT, averager and ``p2pd``, on loopback)
of ``--config`` (default ``configs/test.toml``, a ~0.2M-parameter model) for ``--epochs`` (6)
epochs of ``--inner-steps`` (20) inner steps: once with N = 1 (the baseline: one peer alone, every
epoch a solo step) and once for each N in ``--peers`` (2 4 8) and each protocol of ``--protocol``
(``groups``: hivemind matchmaking, groups of at most ``run.target_group_size``, and when several
groups average at one epoch only one group's state is kept; ``two_level``: every ready peer's work
in one state, docs/scaling.md; ``both``, the default). Every run sets ``peer.eval_every=0`` and
a per-epoch checkpoint off (peer 0 would otherwise evaluate and save after every epoch, slower than
the others and the baseline with it): the figures are training throughput. ``--set KEY=VALUE``
(repeatable) passes more overrides to every run, after those. Each run's metrics, logs and
``summary.json`` are in ``OUT/n<N>-<protocol>/`` (``OUT/n1/`` for the baseline); the table goes to
stdout, progress to stderr, every figure to ``OUT/scaling.json`` (``--out``, default
``runs/bench-scaling``). Expected wall time with the defaults: ~7 min on 2 cores (417 s on
2026-12-05: ~40-50 s per run of N <= 4, 80-110 s at N = 8).

EMULATED SPEED, the caveat. N peers on this machine share its cores: 8 peers training flat out on
2 cores would measure the CPU, not the protocol (each peer would get a quarter of a core, and the
"swarm" would be exactly as fast as one peer). So every peer runs with ``peer.emulate_speed``
(``--emulate-speed``, default 0.05): after each inner step it sleeps ``1/0.05 - 1`` times that
step's compute time, i.e. it runs at 5 % of this machine's speed, as a slower device would, and
most of a peer's step time is sleep: the swarm's throughput then measures the protocol (rounds,
waits, kept work), not CPU contention. Why 0.05: each peer's DHT, averager and p2pd processes
cost CPU that emulation does not slow. Measured with the test recipe on 2 cores, 8 peers used
about 1.1 cores at 0.05 (0.4 of them training), 1.5 at 0.1, and 0.15 would need about 1.9, i.e.
CPU-bound. The sleep is proportional to the *measured* step time, so contention that remains
still slows every peer in proportion: the columns ``swarm CPU`` (cores used by the peers' and the
coordinator's processes in the steady window, from /proc) and ``machine busy`` (all of this
machine's CPUs, other jobs included) say how close to the machine's limit each run was, and a
warning is printed past 75 % of the cores (swarm) or 90 % (machine). ``--emulate-speed 1`` turns
emulation off and shows the raw CPU-bound figure (expect efficiency near 1/N on 2 cores).
Absolute tokens/s are of an emulated device; only the ratios mean something.

Definitions (from the peers' metrics records, ``peerI.jsonl``; a step record is an
``outer_step`` or ``solo_step``; its ``tokens`` are the work that peer brought to that round):

- steady window: from ``t0``, the time at which every one of the N peers had reached epoch ``e0``
  (the latest record of any peer at ``e0``), ``e0`` the first epoch >= 1 at which all N peers have
  a step or ``downloaded`` record, to ``t_end``, the last step record of the run. Start-up
  (imports, DHT bootstrap, joiners, the first round) is left out. Epochs e0+1 .. last count.
- trained tokens: the ``tokens`` of every step record of those epochs (all work trained and
  averaged, whether or not the run continued from it); kept tokens: only those of the records
  whose work is in the epoch's *kept state* (``summarize``'s ``kept_state``: the state most peers
  held at that epoch): the records at that digest of peers in the union of their ``contributors``.
  With ``groups``, the members of a group whose state lost trained tokens that are not kept.
  With overlap (the default) the steps a peer trains while its round runs go with its next round:
  those carried at t0 are counted, those still carried at t_end are not, so with short windows the
  swarm rows read low by about (carried at the end - at the start) / window; ``scaling.json`` has
  both (``carried_tokens_start``, ``carried_tokens_end``). More ``--epochs`` shrink the effect.
- tokens/s = tokens / (t_end - t0), for the whole swarm. Single-peer tokens/s: the N = 1 run's
  (kept = trained). Efficiency (kept) = kept tokens/s / (N x single-peer tokens/s); efficiency
  (trained) the same with trained tokens/s. 1.0 = perfect scaling.
- efficiency (kept, vs own speed): kept tokens/s over the sum of the N peers' own speeds *in the
  same run* (each peer's median ``speed`` field, inner steps per second with the emulated sleep,
  of its step records in the window, times its tokens per step): the share of what the peers
  could have trained that reached the kept state. It does not depend on the N = 1 run, so it is
  the figure to read when the machine's load changed between runs (the speeds move with it);
  the solo row's is the single peer's own overhead (its outer steps). On 2 shared cores a lone
  peer that sleeps 95 % of the time measured fewer steps/s than the peers of the small swarms
  (3.8 against 4.8 at N = 2, 2026-12-05), which puts their efficiency against the N = 1 run
  above 1: a warning says so, and this column is the one to read there.
- work kept, consistent: ``summary.json``'s (all epochs, start-up included): the share of
  peer-epochs whose work reached the kept state, and whether every peer held the same state at
  every epoch. Median round s: the median ``allreduce_s`` over the outer_step records (every
  peer's, every epoch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from p2pdiloco.errors import P2PDilocoError  # noqa: E402
from p2pdiloco.simulate import read_metrics, summarize  # noqa: E402

STEP_EVENTS = ("outer_step", "solo_step")
REACH_EVENTS = (*STEP_EVENTS, "downloaded")  # a peer is at an epoch once it stepped to it or downloaded it
PROTOCOLS = ("groups", "two_level")
# Training throughput only: peer 0 (simulate's evaluator and checkpoint keeper) neither evaluates after
# each epoch nor saves a checkpoint each epoch, so no peer is slower than the others and the N = 1
# baseline carries no evaluation either (epoch 0's evaluation, before the window, still runs).
MEASURE_ONLY = ("peer.eval_every=0", "peer.checkpoint_every=1000000")


# ----------------------------------------------------------------------------- metrics (pure)
def kept_states(metrics: dict[str, list[dict]]) -> dict[int, str]:
    """Epoch -> digest of the state the run continued from (``summarize``'s rule)."""
    return {row["epoch"]: row["kept_state"] for row in summarize(metrics, len(metrics), 0.0)["epochs"]}


def kept_tokens_by_epoch(metrics: dict[str, list[dict]]) -> dict[int, int]:
    """Epoch -> tokens in that epoch's kept state: the ``tokens`` of the step records at the kept
    digest whose peer is one of that state's contributors (one record per peer: its last)."""
    kept = kept_states(metrics)
    at_kept: dict[int, dict[str, dict]] = {}  # epoch -> peer -> its last step record at the kept digest
    contributors: dict[int, set[str]] = {}
    for records in metrics.values():
        for r in records:
            if r.get("event") in STEP_EVENTS and r.get("state_hash") == kept.get(r["epoch"]):
                at_kept.setdefault(r["epoch"], {})[r["peer"]] = r
                contributors.setdefault(r["epoch"], set()).update(r.get("contributors", r.get("group", [r["peer"]])))
    return {e: sum(r.get("tokens", 0) for p, r in rs.items() if p in contributors[e]) for e, rs in at_kept.items()}


def trained_tokens_by_epoch(metrics: dict[str, list[dict]]) -> dict[int, int]:
    """Epoch -> tokens of every step record at that epoch (kept or not)."""
    out: dict[int, int] = {}
    for records in metrics.values():
        for r in records:
            if r.get("event") in STEP_EVENTS:
                out[r["epoch"]] = out.get(r["epoch"], 0) + r.get("tokens", 0)
    return out


def steady_window(metrics: dict[str, list[dict]], num_peers: int) -> tuple[int, float, float] | None:
    """(e0, t0, t_end): the first epoch >= 1 that all ``num_peers`` peers reached (a step or a
    download), the time the last of them got there, and the time of the run's last step record.
    None when no such epoch exists or no step came after it."""
    reached: dict[int, dict[str, float]] = {}  # epoch -> peer -> latest time it was at that epoch
    for records in metrics.values():
        for r in records:
            if r.get("event") in REACH_EVENTS and r["epoch"] >= 1:
                at = reached.setdefault(r["epoch"], {})
                at[r["peer"]] = max(at.get(r["peer"], r["time"]), r["time"])
    together = [e for e, peers in sorted(reached.items()) if len(peers) >= num_peers]
    steps = [r for rs in metrics.values() for r in rs if r.get("event") in STEP_EVENTS]
    if not together or not steps:
        return None
    e0 = together[0]
    t0, t_end = max(reached[e0].values()), max(r["time"] for r in steps)
    if not any(r["epoch"] > e0 for r in steps) or t_end <= t0:
        return None
    return e0, t0, t_end


def throughput(metrics: dict[str, list[dict]], num_peers: int) -> dict:
    """Steady-state tokens/s of a run, kept and trained (see the module docstring); tokens/s are None
    when the run has no steady window."""
    steps = [r for rs in metrics.values() for r in rs if r.get("event") in STEP_EVENTS]
    rounds = [r["allreduce_s"] for r in steps if r.get("event") == "outer_step" and r.get("allreduce_s") is not None]
    result = dict(e0=None, last_epoch=max((r["epoch"] for r in steps), default=None), t0=None, t_end=None, window_s=None,
                  kept_tokens=None, trained_tokens=None, kept_tokens_per_s=None, trained_tokens_per_s=None,
                  own_tokens_per_s=None, efficiency_own=None, carried_tokens_start=None, carried_tokens_end=None,
                  median_round_s=statistics.median(rounds) if rounds else None,
                  solo_steps=sum(1 for r in steps if r.get("event") == "solo_step"),
                  peers_reporting=sum(1 for rs in metrics.values() if any(r.get("event") in STEP_EVENTS for r in rs)))
    window = steady_window(metrics, num_peers)
    if window is None:
        return result
    e0, t0, t_end = window
    kept = sum(t for e, t in kept_tokens_by_epoch(metrics).items() if e > e0)
    trained = sum(t for e, t in trained_tokens_by_epoch(metrics).items() if e > e0)
    span = t_end - t0
    own = own_tokens_per_s(metrics, e0)
    result.update(e0=e0, t0=t0, t_end=t_end, window_s=span, kept_tokens=kept, trained_tokens=trained,
                  kept_tokens_per_s=kept / span, trained_tokens_per_s=trained / span, own_tokens_per_s=own,
                  efficiency_own=kept / span / own if own else None, **carried_tokens(metrics, e0))
    return result


def carried_tokens(metrics: dict[str, list[dict]], e0: int) -> dict:
    """Work trained while a round ran and carried into the next epoch (``overlap_steps`` x tokens
    per step), summed over peers: at the window's start (each peer's last step record at or before
    ``e0``) and at its end (each peer's last step record). The window counts the first and not the
    second, so the tokens/s are low by about (end - start) / window_s."""
    start = end = 0.0
    for records in metrics.values():
        steps = [r for r in records if r.get("event") in STEP_EVENTS and r.get("inner_steps")]
        if not steps:
            continue
        per_step = steps[-1]["tokens"] / steps[-1]["inner_steps"]
        before = [r for r in steps if r["epoch"] <= e0]
        start += before[-1].get("overlap_steps", 0) * per_step if before else 0
        end += steps[-1].get("overlap_steps", 0) * per_step
    return dict(carried_tokens_start=start, carried_tokens_end=end)


def own_tokens_per_s(metrics: dict[str, list[dict]], after_epoch: int) -> float | None:
    """The sum over peers of what each could train alone at the speed it measured in this run: the
    median ``speed`` (inner steps per second of compute, emulated sleep included) of its step records
    of epochs after ``after_epoch``, times its tokens per inner step. None without such records."""
    total, found = 0.0, False
    for records in metrics.values():
        steps = [r for r in records if r.get("event") in STEP_EVENTS and r["epoch"] > after_epoch
                 and r.get("speed") and r.get("inner_steps")]
        if steps:
            found = True
            total += statistics.median(r["speed"] for r in steps) * statistics.median(r["tokens"] / r["inner_steps"] for r in steps)
    return total if found else None


def efficiency(tokens_per_s: float | None, num_peers: int, single_tokens_per_s: float | None) -> float | None:
    """``tokens_per_s`` / (``num_peers`` x ``single_tokens_per_s``): 1.0 is perfect scaling."""
    if tokens_per_s is None or not single_tokens_per_s:
        return None
    return tokens_per_s / (num_peers * single_tokens_per_s)


# ----------------------------------------------------------------------------- CPU sampling
class CpuSampler:
    """Samples, about once a second, the CPU ticks of this process's children's sessions (the
    coordinator and the peers, each started in its own session, with their DHT, averager and p2pd
    processes) and of the whole machine (/proc/stat), so a run's steady window can be checked for
    CPU saturation. Linux only; ``available`` is False elsewhere."""

    def __init__(self, every_s: float = 1.0):
        self.every_s = every_s
        self.available = Path("/proc/stat").exists()
        self.tick = os.sysconf("SC_CLK_TCK") if self.available else 100
        self.samples: list[tuple[float, float, int, int]] = []  # (time, swarm ticks so far, machine busy, machine total)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cpu-sampler")
        self._ticks: dict[int, int] = {}
        self._swarm = 0.0

    def __enter__(self) -> "CpuSampler":
        if self.available:
            self._sample()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._sample()
            except Exception:  # /proc raced with an exiting process, or is unreadable: skip this sample
                pass

    def _sample(self) -> None:
        me, stats = os.getpid(), {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                text = Path(entry.path, "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            rest = text[text.rindex(")") + 2:].split()
            stats[int(entry.name)] = (int(rest[1]), int(rest[3]), int(rest[11]) + int(rest[12]))  # ppid, session, ticks
        sessions = {pid for pid, (ppid, _, _) in stats.items() if ppid == me}
        ticks = {pid: t for pid, (_, sid, t) in stats.items() if sid in sessions}
        self._swarm += sum(max(0, t - self._ticks.get(pid, 0)) for pid, t in ticks.items())
        self._ticks = ticks
        cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        total, idle = sum(cpu[:8]), cpu[3] + cpu[4]  # user nice system idle iowait irq softirq steal
        self.samples.append((time.time(), self._swarm, total - idle, total))

    def window(self, t0: float, t_end: float) -> dict:
        """Mean cores used by the swarm, and the machine's busy share, between the samples nearest
        inside [t0, t_end]; Nones when fewer than two samples fall in it."""
        inside = [s for s in self.samples if t0 <= s[0] <= t_end]
        if len(inside) < 2:
            return dict(swarm_cpu_cores=None, machine_busy=None)
        (a, sa, ba, ta), (b, sb, bb, tb) = inside[0], inside[-1]
        return dict(swarm_cpu_cores=(sb - sa) / self.tick / (b - a), machine_busy=(bb - ba) / (tb - ta) if tb > ta else None)


# ----------------------------------------------------------------------------- runs
def run_one(args, num_peers: int, protocol: str | None, out: Path) -> dict:
    """One simulation and its figures; ``protocol`` None: the N = 1 baseline (no rounds)."""
    from p2pdiloco.config import load_recipe
    from p2pdiloco.simulate import default_timeout, run_simulation

    overrides = [f"run.inner_steps={args.inner_steps}", *([f"run.averaging.protocol={protocol}"] if protocol else []),
                 *MEASURE_ONLY, *args.set]
    recipe = load_recipe(args.config, overrides)
    timeout = args.timeout or (default_timeout(recipe, args.epochs, num_peers)
                               + args.epochs * args.inner_steps * 0.1 / args.emulate_speed * max(1.0, num_peers / 2))
    started = time.monotonic()
    with CpuSampler() as cpu, contextlib.redirect_stdout(sys.stderr):  # simulate's own table and progress: stderr
        summary = run_simulation(args.config, overrides=overrides, num_peers=num_peers, epochs=args.epochs, out=out,
                                 timeout=timeout, speeds=[args.emulate_speed] * num_peers)
    wall = time.monotonic() - started
    metrics = {f"peer{i}": read_metrics(out / f"peer{i}.jsonl") for i in range(num_peers)}
    row = dict(peers=num_peers, protocol=protocol or "solo", folder=str(out), overrides=overrides, timeout_s=timeout, wall_s=wall,
               epochs_completed=summary["epochs_completed"], work_kept=summary["work_kept"], consistent=summary["consistent"],
               exit_codes=summary.get("exit_codes"), **throughput(metrics, num_peers))
    row.update(cpu.window(row["t0"], row["t_end"]) if row["t0"] is not None else dict(swarm_cpu_cores=None, machine_busy=None))
    return row


def warnings(row: dict, epochs: int, cores: int) -> list[str]:
    """What makes a row's figures unrepresentative."""
    name, lines = f"N={row['peers']} {row['protocol']}", []
    if row.get("error"):
        return [f"{name}: {row['error']}"]
    if row["epochs_completed"] < epochs:
        lines.append(f"{name}: reached epoch {row['epochs_completed']} of {epochs} (timed out or a peer failed; see {row['folder']})")
    if row["kept_tokens_per_s"] is None:
        lines.append(f"{name}: no steady window (no epoch after the first that all {row['peers']} peers reached)")
    if row["kept_tokens_per_s"] and row["carried_tokens_end"] is not None:
        bias = (row["carried_tokens_end"] - row["carried_tokens_start"]) / row["window_s"] / row["kept_tokens_per_s"]
        if bias > 0.05:
            lines.append(f"{name}: {row['carried_tokens_end'] - row['carried_tokens_start']:,.0f} more tokens carried (overlap) "
                         f"at the window's end than at its start: its tokens/s read ~{100 * bias:.0f} % low")
    if row["peers"] > 1 and row["solo_steps"]:
        lines.append(f"{name}: {row['solo_steps']} solo step(s): a peer found nobody else in the run")
    if not row["consistent"]:
        lines.append(f"{name}: peers held different states at the same epoch (see {row['folder']}/summary.json)")
    if row["swarm_cpu_cores"] is not None and row["swarm_cpu_cores"] > 0.75 * cores:
        lines.append(f"{name}: the swarm used {row['swarm_cpu_cores']:.2f} of {cores} cores: CPU-bound, lower --emulate-speed")
    if row["machine_busy"] is not None and row["machine_busy"] > 0.9:
        lines.append(f"{name}: the machine was {100 * row['machine_busy']:.0f} % busy (other jobs included): "
                     f"every peer's steps were slowed, emulated sleep with them")
    return lines


def faster_than_baseline(rows: list[dict]) -> list[str]:
    """Rows whose efficiency against the N = 1 run exceeds 1: their peers stepped faster than the
    single peer did (the machine's load or a lone, mostly sleeping process's wake-ups changed between
    runs), so read their efficiency against their own speed."""
    solo = next((r for r in rows if r["peers"] == 1 and not r.get("error")), None)
    if not solo or not solo.get("own_tokens_per_s"):
        return []
    lines = []
    for r in rows:
        if r["peers"] > 1 and not r.get("error") and (r.get("efficiency_trained") or 0) > 1.0 and r.get("own_tokens_per_s"):
            ratio = r["own_tokens_per_s"] / r["peers"] / solo["own_tokens_per_s"]
            lines.append(f"N={r['peers']} {r['protocol']}: efficiency above 1: each peer could train {ratio:.2f} x the single "
                         f"peer's tokens/s at the speed it measured; read 'efficiency (kept, vs own speed)' "
                         f"({_fmt(r['efficiency_own'], '.2f')})")
    return lines


def _cpu_model() -> str | None:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return None


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = ["N", "protocol", "trained tok/s (swarm)", "kept tok/s (swarm)", "efficiency (kept)", "efficiency (trained)",
            "efficiency (kept, vs own speed)", "work kept", "median round s", "consistent", "swarm CPU (cores)", "machine busy",
            "window s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['peers']} | {r['protocol']} | failed: {r['error']} |" + " |" * (len(head) - 3))
            continue
        lines.append("| " + " | ".join([
            str(r["peers"]), r["protocol"], _fmt(r["trained_tokens_per_s"], ",.0f"), _fmt(r["kept_tokens_per_s"], ",.0f"),
            _fmt(r["efficiency_kept"], ".2f"), _fmt(r["efficiency_trained"], ".2f"), _fmt(r["efficiency_own"], ".2f"),
            _fmt(r["work_kept"] and 100 * r["work_kept"], ".0f") + (" %" if r["work_kept"] is not None else ""),
            _fmt(r["median_round_s"], ".2f"), "yes" if r["consistent"] else "NO", _fmt(r["swarm_cpu_cores"], ".2f"),
            _fmt(r["machine_busy"] and 100 * r["machine_busy"], ".0f") + (" %" if r["machine_busy"] is not None else ""),
            _fmt(r["window_s"], ".0f"),
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (bench/scaling.py) for the definitions and the emulated-speed caveat.")
    ap.add_argument("--config", default=str(ROOT / "configs" / "test.toml"), help="recipe: a TOML file or a bundled name "
                    "(default: configs/test.toml)")
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 4, 8], help="swarm sizes N, each >= 2 (default: 2 4 8); "
                    "N = 1, the baseline, always runs")
    ap.add_argument("--epochs", type=int, default=6, help="epochs per run (default 6)")
    ap.add_argument("--inner-steps", type=int, default=20, help="run.inner_steps, H (default 20)")
    ap.add_argument("--emulate-speed", type=float, default=0.05, help="peer.emulate_speed of every peer, in (0, 1]: peers sleep "
                    "so they run at this fraction of this machine's speed (default 0.05; 1 = the raw CPU-bound figure)")
    ap.add_argument("--protocol", choices=[*PROTOCOLS, "both"], default="both", help="run.averaging.protocol (default both)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-scaling"), help="results folder (default runs/bench-scaling)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every run (repeatable)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run before its peers are stopped (default: sized "
                    "from the recipe, the epochs and the emulated speed)")
    args = ap.parse_args(argv)
    if not 0 < args.emulate_speed <= 1:
        ap.error(f"--emulate-speed {args.emulate_speed:g}: must be in (0, 1]")
    if any(n < 2 for n in args.peers):
        ap.error("--peers: each N must be at least 2 (N = 1, the baseline, always runs)")
    if args.epochs < 3:
        ap.error("--epochs: at least 3 (the first epochs are start-up, left out of the steady window)")
    if args.inner_steps < 1:
        ap.error("--inner-steps: at least 1")
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    from p2pdiloco.config import load_recipe

    try:  # a bad --config or --set fails here, in one line, before anything starts
        load_recipe(args.config, [f"run.inner_steps={args.inner_steps}", *MEASURE_ONLY, *args.set])
    except (P2PDilocoError, ValueError) as e:
        raise SystemExit(f"bench/scaling: {str(e).splitlines()[0]}") from None
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    plan = [(1, None)] + [(n, p) for n in sorted(set(args.peers)) for p in protocols]
    print(f"bench/scaling: {args.config}, H = {args.inner_steps}, {args.epochs} epochs, emulated speed {args.emulate_speed:g}, "
          f"{cores} cores; {len(plan)} runs: " + ", ".join(f"N={n} {p or 'solo'}" for n, p in plan), file=sys.stderr, flush=True)
    rows: list[dict] = []
    began = time.monotonic()
    try:
        for i, (n, protocol) in enumerate(plan, 1):
            folder = out / (f"n{n}-{protocol}" if protocol else "n1")
            print(f"[{i}/{len(plan)}] N={n} {protocol or 'solo (baseline)'}: simulating {args.epochs} epochs in {folder} ...",
                  file=sys.stderr, flush=True)
            try:
                row = run_one(args, n, protocol, folder)
            except (P2PDilocoError, OSError, ValueError) as e:  # a bad override, a coordinator that did not start
                row = dict(peers=n, protocol=protocol or "solo", folder=str(folder), error=f"{type(e).__name__}: {e}".splitlines()[0])
            rows.append(row)
            if row.get("error"):
                print(f"[{i}/{len(plan)}] N={n} {protocol or 'solo'}: FAILED: {row['error']}", file=sys.stderr, flush=True)
            else:
                print(f"[{i}/{len(plan)}] N={n} {protocol or 'solo'}: {row['wall_s']:.0f} s; kept "
                      f"{_fmt(row['kept_tokens_per_s'], ',.0f')} tok/s, trained {_fmt(row['trained_tokens_per_s'], ',.0f')} tok/s "
                      f"over {_fmt(row['window_s'], '.0f')} s", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # run_simulation's finally has stopped the peers and the coordinator
        print("\ninterrupted: peers and coordinator stopped; no table, no JSON written", file=sys.stderr)
        raise SystemExit(130) from None
    single = next((r.get("kept_tokens_per_s") for r in rows if r["peers"] == 1), None)
    for r in rows:
        if not r.get("error"):
            r["efficiency_kept"] = efficiency(r["kept_tokens_per_s"], r["peers"], single)
            r["efficiency_trained"] = efficiency(r["trained_tokens_per_s"], r["peers"], single)
    wall = time.monotonic() - began

    print(f"\nScaling efficiency: {args.config}, H = {args.inner_steps}, {args.epochs} epochs per run, every peer at emulated "
          f"speed {args.emulate_speed:g} (sleeps after each step: {100 * args.emulate_speed:g} % of this machine's speed), "
          f"{cores} cores, loopback; single-peer tokens/s (N = 1): {_fmt(single, ',.0f')}; {wall:.0f} s in all\n")
    print(table(rows))
    print("\nefficiency = swarm tokens/s over N x the single peer's, in the steady window (start-up left out); kept: only the "
          "work in each epoch's kept state.")
    if args.emulate_speed < 1:
        print(f"Emulated speed {args.emulate_speed:g}: peers sleep most of each step, so the figures measure the protocol "
              "(rounds, waits, kept work), not CPU contention; swarm CPU and machine busy show how far from CPU-bound each run was.")
    else:
        print("Emulated speed 1: no sleep; the N peers share this machine's cores, so the figures are CPU-bound.")
    notes = [line for r in rows for line in warnings(r, args.epochs, cores)]
    notes += faster_than_baseline(rows)
    if single is None:
        notes.insert(0, "no single-peer figure (the N = 1 run failed or had no steady window): no efficiencies")
    for line in notes:
        print(f"  WARNING {line}")
    result = dict(config=args.config, inner_steps=args.inner_steps, epochs=args.epochs, emulate_speed=args.emulate_speed,
                  protocols=list(protocols), extra_overrides=args.set, cores=cores, cpu=_cpu_model(), machine=platform.platform(),
                  python=platform.python_version(), single_peer_tokens_per_s=single, wall_s=wall, rows=rows, warnings=notes)
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'scaling.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
