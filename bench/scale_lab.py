"""The two-level round in the lab at 16, 128 and 1,024 peers (issue 19, item 4).

    .venv/bin/python bench/scale_lab.py                                   # 16, 128, 1024 peers, 3 seeds, 8 rounds
    .venv/bin/python bench/scale_lab.py --peers 16 64 --rounds 4 --seeds 1 --out /tmp/lab.json

For each swarm size N, runs :mod:`p2pdiloco.scalesim` (the protocol code of :mod:`p2pdiloco.plan`,
the same for every N, driven by simulated peers on a virtual clock) over a few seeds, with
``--fail`` of the peers dying per round at uniform times, and prints a markdown table:

- work kept: the share of the peer-epochs trained that landed in the state (median and min over
  seeds); the issue's target is at least 95 % with 1 % of peers failing per round;
- forks: rounds that ended with more than one state (all seeds); downloads: surviving peers that
  had to download the winning state (all seeds and rounds; a newcomer's first download is not
  counted). Both are 0 when every peer reads the same ready set;
- bytes per peer per round (MB, 10^6 bytes, median over seeds of the median round) of ``--params``
  values through ``--codec``, against the butterfly bound 2 (N-1)/N times the payload; the
  issue's target is at most 1.5 times the bound;
- round time: the median round's virtual seconds (stages at ``bandwidth_mbit`` and ``latency_s``,
  plus a stage deadline of ``wait_s`` whenever a peer it awaits died), median over seeds;
- wall s: the median real seconds one simulation of ``--rounds`` rounds took on this machine.

Then a line with the round time against N. Progress goes to stderr; ``--out`` writes every run's
figures (per-round rows included) as JSON. Values are not simulated (see scalesim's docstring):
this measures the protocol's bookkeeping, not real peers, which do not run it yet
(docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from p2pdiloco import scalesim

MB = 1e6


def measure(peers: int, seeds: list[int], args: argparse.Namespace) -> dict:
    """Every seed's run at ``peers``, and the figures of the table's row."""
    runs = []
    for i, seed in enumerate(seeds):
        sim = scalesim.ScaleSim(peers=peers, group_size=args.group_size, rounds=args.rounds, params=args.params,
                                codec=args.codec, fail=args.fail, seed=seed)
        started = time.perf_counter()
        result = scalesim.run(sim)
        result["wall_s"] = time.perf_counter() - started
        runs.append(result)
        print(f"N={peers} seed {seed} ({i + 1}/{len(seeds)}): work kept {result['work_kept']:.4f}, "
              f"{result['wall_s']:.1f} s", file=sys.stderr, flush=True)
    kept = [r["work_kept"] for r in runs]
    return dict(
        peers=peers, groups=runs[0]["groups"], seeds=seeds,
        work_kept_median=statistics.median(kept), work_kept_min=min(kept),
        work_accounted=all(r["work_accounted"] for r in runs),
        forks=sum(r["forks"] for r in runs), downloads=sum(r["downloads"] for r in runs),
        bytes_per_peer=statistics.median(r["bytes_per_peer"] for r in runs),
        butterfly_bound=runs[0]["butterfly_bound"],
        bytes_ratio=statistics.median(r["bytes_ratio"] for r in runs),
        round_s=statistics.median(r["round_s"] for r in runs),
        wall_s=statistics.median(r["wall_s"] for r in runs),
        runs=runs,
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| N | groups | work kept (median / min) | forks | steady-state downloads | bytes / peer / round (MB) "
        "| butterfly bound (MB) | ratio | round time (virtual s, median) | wall s per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['peers']:,} | {r['groups']} | {r['work_kept_median']:.4f} / {r['work_kept_min']:.4f} | {r['forks']} "
            f"| {r['downloads']} | {r['bytes_per_peer'] / MB:.2f} | {r['butterfly_bound'] / MB:.2f} "
            f"| {r['bytes_ratio']:.4f} | {r['round_s']:.1f} | {r['wall_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, nargs="+", default=[16, 128, 1024], help="swarm sizes N")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--fail", type=float, default=0.01, help="share of peers dying per round")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS-1 per N")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--params", type=int, default=150_000_000, help="values in the pseudo-gradient")
    ap.add_argument("--codec", default="blockwise8")
    ap.add_argument("--out", type=Path, help="write every run's figures here (JSON)")
    args = ap.parse_args()

    seeds = list(range(args.seeds))
    started = time.perf_counter()
    # Warm up: the first run pays for the codec's lazy imports, which are not the simulation's time.
    scalesim.run(scalesim.ScaleSim(peers=2, rounds=1, params=args.params, codec=args.codec, fail=0.0))
    rows = [measure(n, seeds, args) for n in args.peers]
    print(f"scale lab: {args.rounds} rounds, fail {args.fail:g} per round, groups of {args.group_size}, "
          f"{args.params:,} values ({args.codec}), seeds {seeds}")
    print()
    print(table(rows))
    print()
    print("round time (virtual s, median) vs N: " + ", ".join(f"{r['peers']:,}: {r['round_s']:.1f}" for r in rows))
    kept = min(r["work_kept_min"] for r in rows)
    ratio = max(r["bytes_ratio"] for r in rows)
    print(f"targets: work kept >= 0.95 ({'met' if kept >= 0.95 else 'NOT met'}, min {kept:.4f}); "
          f"bytes <= 1.5 x butterfly bound ({'met' if ratio <= 1.5 else 'NOT met'}, max {ratio:.4f}); "
          f"all work accounted: {all(r['work_accounted'] for r in rows)}")
    print(f"total wall: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                            rows=rows), indent=1))


if __name__ == "__main__":
    main()
