#!/usr/bin/env python
"""One peer of bench/robust.py's timed rounds: real DHT and averager, several rounds per rule.

    python bench/robust_worker.py PLAN_JSON RANK [INITIAL_PEER...]

The plan (written by bench/robust.py) lists ``cases`` (name, method, hostile count), the vector
``size``, the ``rounds`` per case and the ``workers``. For each case the peer starts a fresh
averager with that aggregation rule (its own prefix, so no two cases ever meet), then runs the
rounds; before each round every peer waits at a file barrier, so a round's seconds are those of
matchmaking plus the all-reduce, not of waiting for a slower peer to finish the previous one.

A hostile peer (the last ``hostile`` ranks) gets ``P2PDILOCO_FAULT=send:ATTACK@1+`` for the case:
the real fault path of :meth:`PseudoGradientAverager.average` (the fault is read at every round,
so setting it in-process switches it per case). Vectors are those of the swarm tests'
``AVG_CORRELATED=1``: ``common + 0.3 noise(rank)``, weight 1, so every peer can rebuild the honest
peers' mean and measure how far each round's result is from it.

Prints its multiaddr on stdout first; writes ``rank{RANK}.json`` (per case and round: seconds,
the ranks flagged, relative error to the honest mean, a digest of the average) into the plan's folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from p2pdiloco import dht as dht_node, faults  # noqa: E402
from p2pdiloco.averaging.front import PseudoGradientAverager  # noqa: E402
from p2pdiloco.config import AggregationConfig, AveragingConfig  # noqa: E402
from p2pdiloco.errors import AveragingFailed  # noqa: E402

BARRIER_S = 180.0  # generous: four peers share two busy cores


def vector(rank: int, size: int) -> torch.Tensor:
    common = torch.randn(size, generator=torch.Generator().manual_seed(1234))
    return common + 0.3 * torch.randn(size, generator=torch.Generator().manual_seed(rank))


def barrier(folder: Path, name: str, rank: int, workers: int) -> None:
    """Wait until every peer reached ``name`` (a file per peer): all start the next round together."""
    (folder / f"{name}.{rank}.barrier").touch()
    deadline = time.monotonic() + BARRIER_S
    while len(list(folder.glob(f"{name}.*.barrier"))) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name}: the other peers never came")
        time.sleep(0.02)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("p2pdiloco").setLevel(logging.DEBUG)  # why a member dropped out: into rank*.log
    plan_path, rank, *peers = sys.argv[1:]
    rank = int(rank)
    plan = json.loads(Path(plan_path).read_text())
    folder = Path(plan_path).parent
    size, workers, rounds = plan["size"], plan["workers"], plan["rounds"]
    torch.set_num_threads(1)  # four peers (each with an averager process and p2pd) share the cores
    mine = vector(rank, size)
    honest_means = {}  # hostile count -> the honest peers' mean (what the round should give)
    for hostile in sorted({c["hostile"] for c in plan["cases"]}):
        honest_means[hostile] = sum(vector(r, size) for r in range(workers - hostile)) / (workers - hostile)
    dht = dht_node.start_dht(peers)
    print(dht_node.maddrs_of(dht)[0], flush=True)
    # The swarm tests' limits: they are deadlines for a broken round, not what a round takes.
    cfg = AveragingConfig(matchmaking_s=10.0, request_s=3.0, allreduce_s=60.0, next_chunk_s=30.0, round_s=90.0)
    records, epoch = [], 0
    try:
        for case in plan["cases"]:
            name, hostile = case["name"], case["hostile"]
            if rank >= workers - hostile:
                os.environ[faults.ENV] = f"send:{case['attack']}@1+"
            else:
                os.environ.pop(faults.ENV, None)
            avg = PseudoGradientAverager(
                dht, size, prefix=f"robustbench-{name}", cfg=cfg, compression="none", target_group_size=workers,
                min_group_size=workers, state_fn=lambda: ({}, []), aggregation=AggregationConfig(method=case["method"]),
            )
            try:
                barrier(folder, f"{name}-up", rank, workers)
                for r in range(rounds):
                    epoch += 1
                    barrier(folder, f"{name}-r{r}", rank, workers)
                    row = dict(case=name, round=r, rank=rank, hostile_peer=rank >= workers - hostile)
                    try:
                        result = avg.average(mine, epoch=epoch, state_hash="same", weight=1.0, gather={"rank": rank},
                                             expected_size=workers)
                        target = honest_means[hostile]
                        ranks = {peer: data.get("rank") for peer, data in result.gathered.items()}
                        row.update(seconds=result.seconds, group=len(result.group),
                                   flagged_ranks=sorted(ranks[p] for p in result.flagged if p in ranks),
                                   error=((result.average - target).norm() / target.norm()).item(),
                                   digest=hashlib.sha256(result.average.numpy().tobytes()).hexdigest()[:16])
                    except AveragingFailed as e:
                        row.update(failed=str(e))
                    records.append(row)
                # A peer done first must not stop its averager while others still read from it.
                barrier(folder, f"{name}-done", rank, workers)
            finally:
                avg.shutdown()
    finally:
        os.environ.pop(faults.ENV, None)
        (folder / f"rank{rank}.json").write_text(json.dumps(records))
        dht.shutdown()


if __name__ == "__main__":
    main()
