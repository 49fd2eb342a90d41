"""Peers of unequal speed (issue 5): lock-step DiLoCo against naive async and delayed Nesterov + DyLU.

    .venv/bin/python bench/heterogeneous.py                        # = speeds: 3 arms on loopback, ~30 min on 2 cores
    .venv/bin/python bench/heterogeneous.py speeds --arms dn_dylu  # one arm again (lock-step reused from OUT/lockstep)
    sudo .venv/bin/python bench/heterogeneous.py wan               # overlap on/off, 20 Mbit/s, 200 ms RTT

Three real ``p2pdiloco join`` peers and a coordinator (``p2pdiloco.simulate``) train the recipe
(``--config``, default ``tiny-cpu``, H = 20) with emulated speeds ``--speeds 1,0.5,0.25``: peer i
sleeps after each inner step so it runs at that fraction of this machine's speed
(``peer.emulate_speed``). Peer 0, the fastest, evaluates the global model after every outer step
it takes part in. Each part prints a table and writes a JSON file under ``--out`` (default
``runs/bench-heterogeneous``); every arm's metrics, logs and ``summary.json`` are in ``OUT/<arm>/``.

speeds (the default), on loopback, arms run one after another (``--arms`` picks a subset; an arm
not run is read back from ``OUT/<arm>/`` if an earlier run left it there):

    lockstep     run.outer_optimizer=nesterov, dynamic_local_updates=false, overlap=false,
                 averaging.grace_s=600: lock-step DiLoCo, every round waits for the slowest peer.
                 ``--lockstep-epochs`` epochs (default 8). The baseline.
    naive_async  nesterov, DyLU off, overlap on, grace_s=0: a round never waits for stragglers
                 (it starts as soon as two peers are ready), stragglers bring their work late and
                 stale, and every round is a full Nesterov step on whoever came: the paper's naive
                 asynchronous DiLoCo, in rounds.
    dn_dylu      delayed_nesterov with outer_delay = number of peers (3), DyLU on, overlap on,
                 grace_s=5.

    The async arms run until they have processed at least lock-step's tokens: lock-step's total
    tokens T (see below) over an expected number of tokens per epoch, times ``--margin`` (1.15),
    rounded up: dn_dylu expects H x B x S x sum(speeds) per epoch (each peer runs H x its speed
    steps), naive_async H x B x S x min_group_size (a round needs at least that many peers, each
    with at least H steps). Overshooting is fine: the figures are cut at T.
    ``--set`` overrides (repeatable) apply to every arm, after the arm's own; ``--seed`` sets run.seed.

wan (needs root, ``ip`` and ``/dev/net/tun``): the same swarm, each peer in its own network
namespace, linked by the user-space WAN emulator of ``bench/wan.py`` at ``--rate-mbit`` (20) each
way per peer and ``--delay-ms`` (50) one way per node, so a packet takes 2 x 50 = 100 ms from one
peer to another and a round trip 200 ms (as ``netem delay`` on every host's egress; wan.py's
convention, also that of ``bench/codecs.py netem``). The coordinator runs in peer 0's
namespace. Arms, ``--epochs`` (6) each: ``overlap_on`` (dn_dylu's settings) and ``overlap_off``
(the same with run.overlap=false). The pseudo-gradient of tiny-cpu is ~4.2M fp32 values (~17 MB;
in the all-reduce each of 3 peers sends 2 x 2/3 of it, ~22 MB, ~9 s at 20 Mbit/s), too much for
the recipe's averaging timeouts:
run.averaging.allreduce_s, next_chunk_s and round_s are raised (``--allreduce-s`` 120,
``--next-chunk-s`` 30, ``--round-s`` 200) and peer.state_download_s to 120; ``--compression``
(default none) sets run.compression. Writes ``OUT/heterogeneous-wan.json``.

Definitions (all from the peers' metrics records; ``tokens`` of a record is what that peer
contributed to that round):

- tokens, T: the sum over peers and epochs of ``tokens`` in ``outer_step`` (and ``solo_step``)
  records; cumulative tokens at epoch e: the same over the records of epochs <= e (the global
  model of epoch e holds exactly those). T is lock-step's total.
- final_val_at_equal_tokens: the validation loss of the global model at T tokens, interpolated
  linearly *in cumulative tokens* between the last evaluated epoch below T and the first evaluated
  epoch at or above T (no interpolation when that epoch holds exactly T tokens, as lock-step's final
  epoch does). ``equal_tokens_epoch`` is the first epoch whose cumulative tokens reach T. Null when
  the arm never reached T, or when no epoch from there on was evaluated (peer 0 evaluates only after
  the rounds it takes part in). val_diff_vs_lockstep_pct = 100 (val - lockstep's) / lockstep's.
- time_to_lockstep_final_s: seconds since the start of the arm (``val_curve``, which starts before
  the coordinator) at which its validation loss first reaches lock-step's final one, interpolated
  linearly in time between the last evaluation above and the first at or below it
  (``..._first_eval_s``: that evaluation's time, not interpolated). For lock-step itself: the time
  of its final evaluation. speedup_vs_lockstep = lock-step's time / the arm's. Null if never reached.
- compute_utilization: ``summary.json``'s: per peer, the sum of compute_s over the sum of
  (wall_s - eval_s) of its outer/solo step records, then the mean over the peers that have any;
  emulated slowness counts as compute.
- idle_s_per_round: the mean of ``idle_s`` over every peer's outer_step records (one per peer and
  round it took part in); allreduce_s_per_round (wan): the mean of ``allreduce_s`` over those with
  a group of 2 or more. rounds: the number of distinct epochs reached by an outer step;
  peer_rounds: the number of outer_step records; solo_steps: the number of solo_step records (a
  peer that found nobody else in the run, e.g. one that finished its first epoch before the others
  had joined: a warning is printed, the arm's figures are then not representative).

Targets (issue 5), printed beside the figures: dn_dylu speedup >= 1.8x; dn_dylu within 1 % of
lock-step at equal tokens; naive async visibly worse (here: more than 1 % above lock-step and above
dn_dylu at equal tokens); wan: compute utilization >= 95 % with overlap on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(1, str(ROOT / "bench"))  # bench/wan.py

from p2pdiloco.config import load_recipe, recipe_path  # noqa: E402
from p2pdiloco.simulate import (  # noqa: E402
    ProcessGroup, default_timeout, peer_args, read_metrics, run_simulation, start_coordinator, summarize,
)

STEP_EVENTS = ("outer_step", "solo_step")
SPEED_ARMS = ("lockstep", "naive_async", "dn_dylu")
WAN_ARMS = ("overlap_on", "overlap_off")


def speed_arm_overrides(arm: str, peers: int) -> list[str]:
    return {
        "lockstep": ["run.outer_optimizer=nesterov", "run.dynamic_local_updates=false", "run.overlap=false",
                     "run.averaging.grace_s=600"],
        "naive_async": ["run.outer_optimizer=nesterov", "run.dynamic_local_updates=false", "run.overlap=true",
                        "run.averaging.grace_s=0"],
        "dn_dylu": ["run.outer_optimizer=delayed_nesterov", f"run.outer_delay={peers}", "run.dynamic_local_updates=true",
                    "run.overlap=true", "run.averaging.grace_s=5"],
    }[arm]


def wan_arm_overrides(arm: str, peers: int) -> list[str]:
    base = speed_arm_overrides("dn_dylu", peers)
    return base if arm == "overlap_on" else [*base, "run.overlap=false"]


# ----------------------------------------------------------------------------- analysis
def load_metrics(folder: Path, peers: int) -> dict[str, list[dict]]:
    return {f"peer{i}": read_metrics(folder / f"peer{i}.jsonl") for i in range(peers)}


def _steps(metrics: dict[str, list[dict]]) -> list[dict]:
    return [r for rs in metrics.values() for r in rs if r.get("event") in STEP_EVENTS]


def cumulative_tokens(metrics: dict[str, list[dict]]) -> dict[int, int]:
    """Epoch -> tokens held by the global model of that epoch (every step record of epochs <= it)."""
    per_epoch: dict[int, int] = {}
    for r in _steps(metrics):
        per_epoch[r["epoch"]] = per_epoch.get(r["epoch"], 0) + r.get("tokens", 0)
    cum, total = {0: 0}, 0
    for epoch in sorted(per_epoch):
        total += per_epoch[epoch]
        cum[epoch] = total
    return cum


def _tokens_at(cum: dict[int, int], epoch: int) -> int:
    return max((t for e, t in cum.items() if e <= epoch), default=0)


def evaluated(metrics: dict[str, list[dict]]) -> dict[int, float]:
    """Epoch -> validation loss of the global model (peer 0's evaluations; epoch 0 = the initial model)."""
    val: dict[int, float] = {}
    for rs in metrics.values():
        for r in rs:
            if r.get("val_loss") is not None:
                val.setdefault(r["epoch"], r["val_loss"])
    return val


def val_at_tokens(metrics: dict[str, list[dict]], target: float) -> dict:
    cum = cumulative_tokens(metrics)
    reached = [e for e in sorted(cum) if cum[e] >= target]
    points = sorted((_tokens_at(cum, e), e, v) for e, v in evaluated(metrics).items())
    result = dict(val=None, equal_tokens_epoch=reached[0] if reached else None, bracket=None)
    after = next((i for i, p in enumerate(points) if p[0] >= target), None)
    if after is None:
        return result
    t1, e1, v1 = points[after]
    if t1 == target or after == 0:
        result.update(val=v1, bracket=[e1, e1])
        return result
    t0, e0, v0 = points[after - 1]
    result.update(val=v0 + (v1 - v0) * (target - t0) / (t1 - t0), bracket=[e0, e1])
    return result


def time_to_reach(val_curve: list[list[float]], target: float) -> tuple[float | None, float | None]:
    """(interpolated, first evaluation's) seconds at which the curve first gets to ``target`` or below."""
    for i, (t, v) in enumerate(val_curve):
        if v <= target:
            if i == 0:
                return t, t
            t0, v0 = val_curve[i - 1]
            return t0 + (t - t0) * (v0 - target) / (v0 - v), t
    return None, None


def per_peer(metrics: dict[str, list[dict]]) -> dict[str, dict]:
    rows = {}
    for peer, records in metrics.items():
        steps = [r for r in records if "compute_utilization" in r]
        busy = sum(r["wall_s"] - r.get("eval_s", 0.0) for r in steps)
        rows[peer] = dict(
            rounds=sum(1 for r in records if r.get("event") == "outer_step"),
            tokens=sum(r.get("tokens", 0) for r in records if r.get("event") in STEP_EVENTS),
            compute_utilization=sum(r["compute_s"] for r in steps) / busy if busy > 0 else None,
            idle_s_per_round=statistics.mean(r["idle_s"] for r in steps) if steps else None,
            inner_steps_mean=statistics.mean(r["inner_steps"] for r in steps) if steps else None,
            downloads=sum(1 for r in records if r.get("event") == "downloaded"),
        )
    return rows


def common_figures(metrics: dict[str, list[dict]], summary: dict) -> dict:
    steps = _steps(metrics)
    rounds = [r for r in steps if r.get("event") == "outer_step"]
    clocked = [r for r in rounds if "idle_s" in r]
    averaged = [r for r in rounds if r.get("group_size", 0) >= 2]
    return dict(
        epochs_completed=summary["epochs_completed"],
        rounds=len({r["epoch"] for r in rounds}),
        peer_rounds=len(rounds),
        solo_steps=sum(1 for r in steps if r.get("event") == "solo_step"),
        mean_group_size=statistics.mean(r["group_size"] for r in rounds) if rounds else None,
        tokens=sum(r.get("tokens", 0) for r in steps),
        compute_utilization=summary["compute_utilization"],
        idle_s_per_round=statistics.mean(r["idle_s"] for r in clocked) if clocked else None,
        allreduce_s_per_round=statistics.mean(r["allreduce_s"] for r in averaged) if averaged else None,
        staleness_mean=statistics.mean(r.get("staleness", 0) for r in rounds) if rounds else None,
        late_share=sum(1 for r in rounds if r.get("staleness", 0) > 0) / len(rounds) if rounds else None,
        val_loss_initial=summary["val_loss_initial"],
        val_loss_final=summary["val_loss_final"],
        consistent=summary["consistent"],
        wall_s=summary["wall_s"],
        exit_codes=summary.get("exit_codes"),
        per_peer=per_peer(metrics),
    )


def warnings(arm: str, row: dict) -> list[str]:
    """What makes an arm's figures unrepresentative: solo steps, peers that never averaged."""
    lines = []
    if row["solo_steps"]:
        lines.append(f"{arm}: {row['solo_steps']} solo step(s) (a peer found nobody else in the run: typically one that "
                     f"finished an epoch before the others had joined)")
    idle = [p for p, r in row["per_peer"].items() if not r["rounds"]]
    if idle:
        lines.append(f"{arm}: {', '.join(idle)} took part in no round; compute_utilization is the mean over the peers with "
                     f"at least one outer or solo step only")
    if not row["consistent"]:
        lines.append(f"{arm}: peers held different states at the same epoch (see summary.json)")
    return lines


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


# ----------------------------------------------------------------------------- speeds
def speeds(args) -> dict:
    out = Path(args.out).resolve()
    speeds_ = _parse_speeds(args.speeds)
    n = len(speeds_)
    common = [f"run.seed={args.seed}"]
    recipe = load_recipe(args.config, [*common, *speed_arm_overrides("dn_dylu", n), *args.set])
    run = recipe.run
    step_tokens = run.data.batch_size * run.data.seq_len
    epoch_tokens = run.inner_steps * step_tokens  # one peer's H steps
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in SPEED_ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {', '.join(unknown)}; known: {', '.join(SPEED_ARMS)}")
    print(f"{recipe.run.name}: {n} peers at speeds {', '.join(f'{s:g}' for s in speeds_)}, H={run.inner_steps}, "
          f"{step_tokens} tokens per inner step; arms: {', '.join(a for a in SPEED_ARMS if a in arms)}", flush=True)

    summaries: dict[str, dict] = {}
    epochs_run: dict[str, int] = {}

    def simulate(arm: str, epochs: int) -> None:
        print(f"\n=== {arm}: {epochs} epochs ({' '.join(speed_arm_overrides(arm, n))})", flush=True)
        epochs_run[arm] = epochs
        summaries[arm] = run_simulation(args.config, overrides=[*common, *speed_arm_overrides(arm, n), *args.set], num_peers=n,
                                        epochs=epochs, out=out / arm, timeout=args.timeout, speeds=speeds_)

    def reuse(arm: str) -> None:
        path = out / arm / "summary.json"
        if path.exists():
            summaries[arm] = json.loads(path.read_text())
            summaries[arm]["reused"] = True
            print(f"{arm}: not run; results of an earlier run read back from {out / arm}", flush=True)

    if "lockstep" in arms:
        simulate("lockstep", args.lockstep_epochs)
    else:
        reuse("lockstep")
    if "lockstep" in summaries:
        lock_metrics = load_metrics(out / "lockstep", n)
        target = sum(r.get("tokens", 0) for r in _steps(lock_metrics))
        target_source = "measured"
    else:
        target = args.lockstep_epochs * n * epoch_tokens
        target_source = "expected (no lock-step results: no figures against lock-step)"
    print(f"\nlock-step tokens T = {target:,} ({target_source})", flush=True)
    expected_per_epoch = dict(dn_dylu=epoch_tokens * sum(speeds_), naive_async=epoch_tokens * min(run.min_group_size, n))
    for arm in ("naive_async", "dn_dylu"):
        if arm in arms:
            simulate(arm, max(1, math.ceil(target / expected_per_epoch[arm] * args.margin)))
        else:
            reuse(arm)

    # figures
    ref = None
    if "lockstep" in summaries and summaries["lockstep"]["val_curve"]:
        curve = summaries["lockstep"]["val_curve"]
        ref = dict(tokens=target, val=summaries["lockstep"]["val_loss_final"], time_s=curve[-1][0])
    rows = {}
    for arm in SPEED_ARMS:
        if arm not in summaries:
            continue
        summary, metrics = summaries[arm], load_metrics(out / arm, n)
        row = common_figures(metrics, summary)
        row.update(epochs=epochs_run.get(arm), reused=summary.get("reused", False), overrides=speed_arm_overrides(arm, n))
        row.update(final_val_at_equal_tokens=None, equal_tokens_epoch=None, equal_tokens_bracket=None, val_diff_vs_lockstep_pct=None,
                   time_to_lockstep_final_s=None, time_to_lockstep_final_first_eval_s=None, speedup_vs_lockstep=None)
        if ref is not None:
            at = val_at_tokens(metrics, ref["tokens"])
            row.update(final_val_at_equal_tokens=at["val"], equal_tokens_epoch=at["equal_tokens_epoch"],
                       equal_tokens_bracket=at["bracket"])
            if at["val"] is not None and ref["val"]:
                row["val_diff_vs_lockstep_pct"] = 100 * (at["val"] - ref["val"]) / ref["val"]
            if arm == "lockstep":
                seconds = first = ref["time_s"]
            else:
                seconds, first = time_to_reach(summary["val_curve"], ref["val"])
            row.update(time_to_lockstep_final_s=seconds, time_to_lockstep_final_first_eval_s=first,
                       speedup_vs_lockstep=ref["time_s"] / seconds if seconds else None)
        rows[arm] = row

    print(f"\n{n} peers at speeds {args.speeds}, {args.config}, seed {args.seed}; lock-step: T = {target:,} tokens"
          + (f", final val {ref['val']:.4f} at {ref['time_s']:.0f} s" if ref else ""))
    head = (f"{'arm':>12} {'epochs':>6} {'rounds':>6} {'group':>5} {'Mtokens':>8} {'wall s':>7} {'util %':>6} {'idle s/rnd':>10} "
            f"{'val @T':>7} {'vs lock %':>9} {'t->lock s':>9} {'speedup':>7} {'states':>9}")
    print(head)
    for arm, r in rows.items():
        print(f"{arm:>12} {r['epochs_completed']:6d} {r['rounds']:6d} {_fmt(r['mean_group_size'], '5.2f'):>5} "
              f"{r['tokens'] / 1e6:8.3f} {r['wall_s']:7.0f} {_fmt(r['compute_utilization'] and 100 * r['compute_utilization'], '6.1f'):>6} "
              f"{_fmt(r['idle_s_per_round'], '10.2f'):>10} {_fmt(r['final_val_at_equal_tokens'], '7.4f'):>7} "
              f"{_fmt(r['val_diff_vs_lockstep_pct'], '+9.2f'):>9} {_fmt(r['time_to_lockstep_final_s'], '9.0f', 'never'):>9} "
              f"{_fmt(r['speedup_vs_lockstep'], '6.2f') + 'x' if r['speedup_vs_lockstep'] else '-':>7} "
              f"{'identical' if r['consistent'] else 'DIFFER':>9}")
    for arm, r in rows.items():
        if r["final_val_at_equal_tokens"] is None and ref is not None:
            if r["equal_tokens_epoch"] is None:
                print(f"  WARNING {arm}: never reached T = {target:,} tokens (only {r['tokens']:,}): run it longer (--margin)")
            else:
                print(f"  WARNING {arm}: reached T at epoch {r['equal_tokens_epoch']}, but no epoch from there on was evaluated "
                      f"(peer 0 evaluates only after the rounds it takes part in): no validation loss at T")
        for line in warnings(arm, r):
            print(f"  WARNING {line}")
    targets = speed_targets(rows)
    print("\nissue 5 targets:")
    for line in targets["lines"]:
        print("  " + line)
    return dict(config=str(recipe_path(args.config)), speeds=speeds_, seed=args.seed, extra_overrides=args.set,
                inner_steps=run.inner_steps, tokens_per_inner_step=step_tokens, lockstep_tokens=target,
                lockstep_tokens_source=target_source, lockstep_val_final=ref and ref["val"], lockstep_time_s=ref and ref["time_s"],
                margin=args.margin, arms=rows, targets=targets["checks"])


def speed_targets(rows: dict[str, dict]) -> dict:
    checks, lines = {}, []
    dn, naive = rows.get("dn_dylu"), rows.get("naive_async")

    def verdict(ok):
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    if dn:
        s = dn["speedup_vs_lockstep"]
        checks["dn_dylu_speedup_ge_1.8"] = None if s is None else s >= 1.8
        lines.append(f"dn_dylu speedup >= 1.8x over lock-step (time to lock-step's final val): "
                     f"{_fmt(s, '.2f', 'never reached')}{'x' if s else ''}  {verdict(checks['dn_dylu_speedup_ge_1.8'])}")
        d = dn["val_diff_vs_lockstep_pct"]
        checks["dn_dylu_within_1pct"] = None if d is None else d <= 1.0
        lines.append(f"dn_dylu within 1 % of lock-step at equal tokens: {_fmt(d, '+.2f', 'n/a')} %  "
                     f"{verdict(checks['dn_dylu_within_1pct'])}")
    if naive:
        d = naive["val_diff_vs_lockstep_pct"]
        dn_d = dn["val_diff_vs_lockstep_pct"] if dn else None
        ok = None if d is None else (d > 1.0 and (dn_d is None or d > dn_d))
        checks["naive_async_visibly_worse"] = ok
        lines.append(f"naive async visibly worse (> +1 % vs lock-step and worse than dn_dylu at equal tokens): "
                     f"{_fmt(d, '+.2f', 'n/a')} % (dn_dylu {_fmt(dn_d, '+.2f', 'n/a')} %)  {verdict(ok)}")
    return dict(checks=checks, lines=lines)


# ----------------------------------------------------------------------------- wan
def run_in_namespaces(config: str, *, overrides: list[str], speeds_: list[float], epochs: int, out: Path, rate_bps: float,
                      delay_s: float, timeout: float | None) -> dict:
    """``run_simulation``, but each peer in its own namespace of the WAN emulator (bench/wan.py)."""
    from p2pdiloco import corpus
    from wan import SUBNET, wan_namespaces

    recipe = load_recipe(config, overrides)  # fail fast on a bad config, before starting anything
    config_file = str(recipe_path(config).resolve())
    n = len(speeds_)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("peer*.jsonl"), *out.glob("*.log"), out / "summary.json"]:
        stale.unlink(missing_ok=True)
    print(f"preparing data and tokenizer for '{recipe.run.name}' ...", flush=True)
    corpus.prepare(recipe.run.data, recipe.run.model.vocab_size, Path(recipe.peer.cache_dir).expanduser())
    timeout = timeout or default_timeout(recipe, epochs, n) / min(speeds_)
    peers: list[ProcessGroup] = []
    coord = None
    codes: list[int] = []
    with wan_namespaces(n, rate_bps, delay_s, out) as namespaces:
        started, started_at = time.monotonic(), time.time()
        try:
            coord, addrs = start_coordinator(out, recipe.peer.bootstrap_s, "--host", f"{SUBNET}.1",
                                             launcher=["ip", "netns", "exec", namespaces[0]])
            for i, ns in enumerate(namespaces):
                args = peer_args(i, config_file, epochs, out, addrs, [*overrides, f'peer.host="{SUBNET}.{i + 1}"'], speeds_[i])
                peers.append(ProcessGroup(["ip", "netns", "exec", ns, *args], out / f"peer{i}.log"))
            deadline, shown = started + timeout, 0.0
            while any(p.alive() for p in peers) and time.monotonic() < deadline:
                if time.monotonic() - shown >= 30:
                    shown = time.monotonic()
                    state = []
                    for i, p in enumerate(peers):
                        records = read_metrics(out / f"peer{i}.jsonl")
                        last = records[-1] if records else None
                        state.append(f"peer{i} " + ("starting" if last is None else f"epoch {last['epoch']} {last.get('event', '')}")
                                     + ("" if p.alive() else f" (exited {p.proc.returncode})"))
                    print(f"  {shown - started:5.0f} s: " + ", ".join(state), flush=True)
                time.sleep(1.0)
            if any(p.alive() for p in peers):
                print(f"timed out after {timeout:.0f} s; stopping the peers", file=sys.stderr, flush=True)
        finally:
            for p in peers:
                p.terminate()  # all of them leave at once, not one after another's grace
            codes = [p.stop() for p in peers]
            if coord is not None:
                coord.stop()
        wall = time.monotonic() - started
    metrics = load_metrics(out, n)
    summary = summarize(metrics, n, wall, started_at)
    summary.update(speeds=speeds_, exit_codes=codes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'} and the peers' metrics and logs in {out}/", flush=True)
    return summary


def wan(args) -> dict:
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists():
        raise SystemExit("wan needs root and /dev/net/tun (network namespaces and TUN devices)")
    out = Path(args.out).resolve()
    speeds_ = _parse_speeds(args.speeds)
    n = len(speeds_)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in WAN_ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {', '.join(unknown)}; known: {', '.join(WAN_ARMS)}")
    link = [f"run.averaging.allreduce_s={args.allreduce_s:g}", f"run.averaging.next_chunk_s={args.next_chunk_s:g}",
            f"run.averaging.round_s={args.round_s:g}", f"run.compression={args.compression}", "peer.state_download_s=120"]
    common = [f"run.seed={args.seed}", *link]
    recipe = load_recipe(args.config, [*common, *wan_arm_overrides("overlap_on", n), *args.set])
    print(f"{recipe.run.name}: {n} peers at speeds {args.speeds}, each in its own namespace; {args.rate_mbit:g} Mbit/s each way per "
          f"peer, {args.delay_ms:g} ms one way per node ({2 * args.delay_ms:g} ms one way between two peers, "
          f"{4 * args.delay_ms:g} ms round trip); "
          f"{recipe.run.model.hidden_size}-wide model; for these links: {' '.join(link)}", flush=True)
    rows = {}
    for arm in arms:
        overrides = [*common, *wan_arm_overrides(arm, n), *args.set]
        print(f"\n=== {arm}: {args.epochs} epochs ({' '.join(wan_arm_overrides(arm, n))})", flush=True)
        summary = run_in_namespaces(args.config, overrides=overrides, speeds_=speeds_, epochs=args.epochs, out=out / f"wan-{arm}",
                                    rate_bps=args.rate_mbit * 1e6, delay_s=args.delay_ms / 1e3, timeout=args.timeout)
        row = common_figures(load_metrics(out / f"wan-{arm}", n), summary)
        row.update(overrides=overrides, bytes_sent_per_round=summary["bytes_sent_per_round"])
        rows[arm] = row

    print(f"\n{n} peers at speeds {args.speeds}, {args.rate_mbit:g} Mbit/s, {2 * args.delay_ms:g} ms one way between peers "
          f"({4 * args.delay_ms:g} ms RTT), "
          f"compression {args.compression}, {args.config}")
    print(f"{'arm':>12} {'epochs':>6} {'rounds':>6} {'group':>5} {'util %':>6} {'idle s/rnd':>10} {'all-reduce s':>12} "
          f"{'MB sent/rnd':>11} {'wall s':>7} {'final val':>9} {'states':>9}")
    for arm, r in rows.items():
        print(f"{arm:>12} {r['epochs_completed']:6d} {r['rounds']:6d} {_fmt(r['mean_group_size'], '5.2f'):>5} "
              f"{_fmt(r['compute_utilization'] and 100 * r['compute_utilization'], '6.1f'):>6} {_fmt(r['idle_s_per_round'], '10.2f'):>10} "
              f"{_fmt(r['allreduce_s_per_round'], '12.2f'):>12} {r['bytes_sent_per_round'] / 1e6:11.2f} {r['wall_s']:7.0f} "
              f"{_fmt(r['val_loss_final'], '9.4f'):>9} {'identical' if r['consistent'] else 'DIFFER':>9}")
    for arm, r in rows.items():
        for line in warnings(arm, r):
            print(f"  WARNING {line}")
    checks = {}
    if "overlap_on" in rows:
        u = rows["overlap_on"]["compute_utilization"]
        checks["overlap_on_utilization_ge_95pct"] = None if u is None else u >= 0.95
        verdict = "n/a" if u is None else ("PASS" if u >= 0.95 else "FAIL")
        print(f"\nissue 5 target: compute utilization >= 95 % with overlap on: {_fmt(u and 100 * u, '.1f', 'n/a')} %  {verdict}")
    return dict(config=str(recipe_path(args.config)), speeds=speeds_, seed=args.seed, rate_mbit=args.rate_mbit,
                delay_ms_one_way_per_node=args.delay_ms, one_way_ms_between_peers=2 * args.delay_ms, rtt_ms_between_peers=4 * args.delay_ms,
                compression=args.compression, link_overrides=link, extra_overrides=args.set, epochs=args.epochs, arms=rows,
                targets=checks)


# ----------------------------------------------------------------------------- main
def _parse_speeds(text: str) -> list[float]:
    from p2pdiloco.errors import P2PDilocoError
    from p2pdiloco.simulate import parse_speeds

    try:
        return parse_speeds(text, len(text.split(",")))
    except P2PDilocoError as e:
        raise SystemExit(str(e)) from None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("speeds", "wan", "-h", "--help"):
        argv.insert(0, "speeds")  # the default part
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default=str(ROOT / "runs" / "bench-heterogeneous"), help="results folder (one subfolder per arm)")
    common.add_argument("--config", default="tiny-cpu", help="recipe: a TOML file or a bundled name (default: tiny-cpu)")
    common.add_argument("--speeds", default="1,0.5,0.25", help="emulated speed of each peer (one per peer)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every arm (repeatable)")
    common.add_argument("--seed", type=int, default=0, help="run.seed")
    common.add_argument("--timeout", type=float, default=None, help="seconds per arm before the peers are stopped (default: sized "
                        "from the recipe, as p2pdiloco simulate does)")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run 'PART --help' for each part's options; see the module docstring for the definitions.")
    parts = ap.add_subparsers(dest="part", metavar="PART", help="speeds (default) or wan")
    sp = parts.add_parser("speeds", parents=[common], help="lockstep vs naive_async vs dn_dylu on loopback (default)",
                          description="Lock-step DiLoCo, naive async and DN + DyLU with peers of unequal speed, on loopback.")
    sp.add_argument("--lockstep-epochs", type=int, default=8, help="epochs of the lock-step arm (default 8)")
    sp.add_argument("--arms", default=",".join(SPEED_ARMS), help=f"comma list, a subset of {','.join(SPEED_ARMS)}")
    sp.add_argument("--margin", type=float, default=1.15, help="async arms: epochs for this many times lock-step's tokens, "
                    "expected (default 1.15)")
    wp = parts.add_parser("wan", parents=[common], help="overlap on/off with each peer behind an emulated WAN link (root)",
                          description="Compute utilization with and without overlap, each peer in a network namespace behind "
                          "the user-space WAN emulator of bench/wan.py (needs root).")
    wp.add_argument("--epochs", type=int, default=6, help="epochs per arm (default 6)")
    wp.add_argument("--arms", default=",".join(WAN_ARMS), help=f"comma list, a subset of {','.join(WAN_ARMS)}")
    wp.add_argument("--rate-mbit", type=float, default=20.0, help="each peer's upload and download rate (default 20)")
    wp.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay per node (two peers: twice this; default 50)")
    wp.add_argument("--compression", default="none", help="run.compression (default none)")
    wp.add_argument("--allreduce-s", type=float, default=120.0, help="run.averaging.allreduce_s for the slow links (default 120)")
    wp.add_argument("--next-chunk-s", type=float, default=30.0, help="run.averaging.next_chunk_s (default 30)")
    wp.add_argument("--round-s", type=float, default=200.0, help="run.averaging.round_s (default 200)")
    args = ap.parse_args(argv)
    try:
        result = dict(speeds=speeds, wan=wan)[args.part](args)
    except KeyboardInterrupt:  # the finally blocks have stopped every peer and coordinator and removed the namespaces
        print("\ninterrupted: peers, coordinators (and namespaces) stopped; no JSON written", file=sys.stderr)
        raise SystemExit(130) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "heterogeneous.json" if args.part == "speeds" else "heterogeneous-wan.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
