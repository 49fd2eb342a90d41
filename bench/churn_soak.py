"""Churn soak: a swarm of real peers where a random peer is SIGKILLed and restarted every ~30 s.

    .venv/bin/python bench/churn_soak.py --peers 4 --minutes 10 --out runs/churn

Each peer slot keeps its identity and checkpoint folder across restarts (a volunteer whose
machine crashed and came back). At the end every peer is stopped (SIGTERM to all at once) and
the run is judged from the peers' metrics files:

- epochs: the highest epoch reached; kills: how many SIGKILLs of a whole peer process group;
- disagreements: epochs at which two peers recorded different states (forks); healed: how many
  times a peer left a losing fork by downloading the winner (``downloaded``, reason ``fork``);
- unhealed forks: disagreeing epochs after which no later epoch reported by two or more peers
  holds one state (two branches that never merged again);
- work kept: peer-epochs whose work reached the state the run continued from, over peer-epochs
  trained (:func:`p2pdiloco.simulate.summarize`'s rule; a killed peer's unfinished epoch is not
  counted as trained, a restarted peer's catch-up download is);
- one-sided rounds: rounds complete at a peer but not confirmed by every member, so not applied
  (the ``one_sided`` count of each outer-step record, summed over each peer process's life; one
  counted after a process's last record before its kill is missed);
- catch-ups: downloads of a newer state by restarted or lagging peers;
- longest stall: the longest time the swarm's highest epoch did not advance;
- validation loss: first and last epochs with a value, and the mean of the first and last quarter;
- leftovers: process groups still alive after the stop (must be 0).

Prints a table and writes ``OUT/churn.json``. Not part of the test suite: it runs for minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import time
from pathlib import Path

from p2pdiloco.simulate import ProcessGroup, _cli, read_metrics, start_coordinator, summarize

DEFAULT_OVERRIDES = ["run.inner_steps=10", "run.inner.total_steps=100000"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "test.toml"))
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=30.0, help="mean seconds between kills (uniform +-50%%)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/churn"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe overrides")
    args = ap.parse_args()

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("peer*.jsonl"), *out.glob("*.log")]:
        stale.unlink()
    rng = random.Random(args.seed)
    overrides = DEFAULT_OVERRIDES + args.overrides
    coord, addrs = start_coordinator(out, 60)

    def start(slot: int) -> ProcessGroup:
        cmd = [*_cli(), "join", args.config, "--metrics-file", str(out / f"peer{slot}.jsonl"),
               "--identity", str(out / f"peer{slot}.key"), "--checkpoint-dir", str(out / f"ckpt{slot}")]
        for addr in addrs:
            cmd += ["--peers", addr]
        for item in overrides:
            cmd += ["--set", item]
        return ProcessGroup(cmd, out / f"peer{slot}.log")

    peers = [start(i) for i in range(args.peers)]
    kills, started = [], time.monotonic()
    end = started + args.minutes * 60
    try:
        while True:
            wait = args.interval * rng.uniform(0.5, 1.5)
            if time.monotonic() + wait > end:
                break
            time.sleep(wait)  # the fault schedule itself: nothing to synchronise with
            slot = rng.randrange(args.peers)
            peers[slot].signal(signal.SIGKILL)
            code = peers[slot].stop(grace=0)
            kills.append(dict(t=round(time.monotonic() - started, 1), slot=slot, exit=code))
            print(f"{kills[-1]['t']:7.1f} s  killed peer {slot} (exit {code}); restarting it", flush=True)
            peers[slot] = start(slot)
        time.sleep(max(0.0, end - time.monotonic()))
    finally:
        for p in peers:
            p.terminate()
        codes = [p.stop(grace=60) for p in peers]
        coord.stop(grace=10)
    leftovers = sum(not p.gone() for p in [*peers, coord])
    report = analyse([read_metrics(out / f"peer{i}.jsonl") for i in range(args.peers)], kills, codes, leftovers,
                     time.monotonic() - started)
    (out / "churn.json").write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        if key != "kill_log":
            print(f"{key:>24}: {value}")
    print(f"written to {out / 'churn.json'}")


def analyse(metrics: list[list[dict]], kills: list[dict], exit_codes: list[int], leftovers: int, wall_s: float) -> dict:
    records = [r for peer in metrics for r in peer]
    summary = summarize({str(i): peer for i, peer in enumerate(metrics)}, len(metrics), wall_s)
    states: dict[int, set[str]] = {}
    for r in records:
        if r.get("event") in ("outer_step", "solo_step", "downloaded"):
            states.setdefault(r["epoch"], set()).add(r["state_hash"])
    progress = sorted((r["time"], r["epoch"]) for r in records if r.get("event") in ("outer_step", "solo_step"))
    best, last_advance, stall = -1, progress[0][0] if progress else 0.0, 0.0
    for t, epoch in progress:
        if epoch > best:
            stall, best, last_advance = max(stall, t - last_advance), epoch, t
    val: dict[int, list[float]] = {}
    for r in records:
        if r.get("val_loss") is not None:
            val.setdefault(r["epoch"], []).append(r["val_loss"])
    curve = [statistics.mean(val[e]) for e in sorted(val)]
    reporting: dict[int, set[str]] = {}
    for r in records:
        if r.get("event") in ("outer_step", "solo_step", "downloaded"):
            reporting.setdefault(r["epoch"], set()).add(r["peer"])
    merged = [e for e in states if len(states[e]) == 1 and len(reporting.get(e, ())) >= 2]
    disagreeing = sorted(e for e, h in states.items() if len(h) > 1)
    quarter = max(1, len(curve) // 4)
    return dict(
        wall_s=round(wall_s),
        epochs=max(states, default=0),
        kills=len(kills),
        disagreeing_epochs=disagreeing,
        unhealed_forks=[e for e in disagreeing if not any(m > e for m in merged)],
        forks_healed=sum(r.get("reason") == "fork" for r in records),
        work_kept=round(summary["work_kept"], 4) if summary["work_kept"] is not None else None,
        work_kept_peer_epochs=f"{summary['work_kept_peer_epochs']}/{summary['peer_epochs_trained']}",
        work_kept_whole=round(summary["work_kept_whole"], 4) if summary["work_kept_whole"] is not None else None,
        work_lost=lost_work(metrics, summary),
        one_sided_rounds=sum(_lifetime_total([r.get("one_sided", 0) for r in peer if r.get("event") == "outer_step"])
                             for peer in metrics),
        max_group_size=max((r.get("group_size", 1) for r in records if r.get("event") == "outer_step"), default=0),
        catch_up_downloads=sum(r.get("event") == "downloaded" and r.get("reason") == "behind" for r in records),
        solo_steps=sum(r.get("event") == "solo_step" for r in records),
        longest_stall_s=round(stall, 1),
        val_loss_first=round(curve[0], 3) if curve else None,
        val_loss_last=round(curve[-1], 3) if curve else None,
        val_loss_first_quarter=round(statistics.mean(curve[:quarter]), 3) if curve else None,
        val_loss_last_quarter=round(statistics.mean(curve[-quarter:]), 3) if curve else None,
        exit_codes_at_stop=exit_codes,
        leftover_process_groups=leftovers,
        kill_log=kills,
    )


def lost_work(metrics: list[list[dict]], summary: dict) -> dict[str, float]:
    """Where the peer-epochs that did not reach the kept state went, in peer-epochs (shares count):

    - ``catch_up``: a (restarted or lagging) peer's epoch spent downloading the swarm's state;
      ``catch_up_rebased``: of those, the downloads that kept unsent work (``rebased_steps`` > 0:
      a lagging peer's work goes, rebased, into its next round, so it is delayed, not lost);
    - ``fork``: an epoch whose state lost the fork rule (healed by a download, or never);
    - ``part``: the share of a round's work left out of the state (a dead owner's column, a dead
      decider's cell; carried into the peer's next round, so delayed rather than lost);
    - ``left_out``: a round applied without this peer's work (a late or refused sender).
    """
    kept = {r["epoch"]: r["kept_state"] for r in summary["epochs"]}
    lost = dict(catch_up=0.0, catch_up_rebased=0.0, fork=0.0, part=0.0, left_out=0.0)
    for peer in metrics:
        epochs: dict[int, list[dict]] = {}
        for r in peer:
            if r.get("event") in ("outer_step", "solo_step", "downloaded"):
                epochs.setdefault(r["epoch"], []).append(r)
        for epoch, records in epochs.items():
            steps = [r for r in records if r["event"] != "downloaded"]
            mine = [r for r in steps if r["state_hash"] == kept.get(epoch)]
            if mine:
                r = mine[-1]
                whole = r["peer"] in r.get("contributors", r.get("group", [r["peer"]]))
                share = (r.get("partly_included") or {}).get(r["peer"], 1.0 if whole else 0.0)
                if share:
                    lost["part"] += 1 - share
                else:
                    lost["left_out"] += 1
            elif steps:
                lost["fork"] += 1
            else:
                lost["catch_up"] += 1
                lost["catch_up_rebased"] += any(r.get("rebased_steps", 0) > 0 for r in records)
    return {k: round(v, 2) for k, v in lost.items()}


def _lifetime_total(counts: list[int]) -> int:
    """The sum of a per-process counter read in order across restarts: it drops when a process
    restarts (a new process counts from 0), so each life adds its last value."""
    total, last = 0, 0
    for value in counts:
        if value < last:
            total += last
        last = value
    return total + last


if __name__ == "__main__":
    main()
