"""A process that runs one two-level round with the others (used by test_twolevel.py).

    python twolevel_worker.py OUT_FILE RANK GROUP_SIZE COMPRESSION [INITIAL_PEER...]

Every worker writes its peer id next to OUT_FILE, waits for the ids of all ``TL_WORKERS`` (6),
builds the plan from them (no matchmaking: each computes the same one), averages a random vector
(weight ``rank + 1``) and writes the result to OUT_FILE (torch.save), or ``{"error": ...}``.
Prints its multiaddr on stdout first, so a test can start the others with it. A worker started
with ``P2PDILOCO_FAULT`` (``partials:kill@1``) dies in the round (``send:nan@1``: sends NaN and
lives on); ``TL_ALIVE`` says how many
workers will finish, so the others know how many to wait for before they leave. ``TL_CLIENTS``
(``1,4``): ranks that run in client mode, which nobody can dial.
"""

import logging
import os
import sys
import time
from pathlib import Path

import torch

from p2pdiloco import dht as dht_node
from p2pdiloco import plan as planning
from p2pdiloco.averaging.front import PseudoGradientAverager
from p2pdiloco.config import AggregationConfig, AveragingConfig
from p2pdiloco.errors import AveragingFailed

SIZE = 600_000


def barrier(folder: Path, suffix: str, count: int, limit_s: float) -> list[Path]:
    deadline = time.monotonic() + limit_s
    while len(found := sorted(folder.glob(f"*{suffix}"))) < count:
        assert time.monotonic() < deadline, f"only {len(found)} of {count} workers reached {suffix}"
        time.sleep(0.1)
    return found


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("p2pdiloco").setLevel(logging.DEBUG)
    out, rank, group_size, compression, *peers = sys.argv[1:]
    out, rank = Path(out), int(rank)
    workers = int(os.environ.get("TL_WORKERS", "6"))
    alive = int(os.environ.get("TL_ALIVE", str(workers)))
    client = str(rank) in os.environ.get("TL_CLIENTS", "").split(",")  # cannot be dialed: pulls its cells
    dht = dht_node.start_dht(peers, client_mode=client)
    print(dht_node.maddrs_of(dht)[0], flush=True)
    cfg = AveragingConfig(matchmaking_s=10.0, request_s=3.0, allreduce_s=60.0, next_chunk_s=float(os.environ.get("TL_SILENCE_S", "20")),
                          round_s=90.0)
    avg = PseudoGradientAverager(dht, SIZE, prefix="tltest", cfg=cfg, compression=compression, target_group_size=4,
                                 min_group_size=2, state_fn=lambda: ({}, []), error_feedback=compression != "none",
                                 aggregation=AggregationConfig(), client_mode=client)
    # Written whole, then renamed: a worker reading the ids must never see a half-written file.
    out.with_suffix(".tmp").write_text(f"{avg.peer_id} {int(client)}")
    out.with_suffix(".tmp").rename(out.with_suffix(".id"))
    ids = [p.read_text().split() for p in barrier(out.parent, ".id", workers, 120)]
    plan = planning.make_plan(1, "digest", [i for i, _ in ids], int(group_size), clients=[i for i, c in ids if c == "1"])
    vector, weight = torch.randn(SIZE, generator=torch.Generator().manual_seed(rank)) * (rank + 1), rank + 1
    try:
        result = avg.average_plan(vector, plan, weight=weight)
        record = {"input": vector, "weight": weight, "peer": avg.peer_id, "average": result.average,
                  "apply": result.outcome.apply, "contributors": result.outcome.contributors,
                  "carried": result.outcome.carried, "decided": result.outcome.decided, "decisions": {c: sorted(m) for c, m in result.decisions.items()},
                  "residual": result.residual, "seconds": result.seconds, "groups": plan.groups,
                  "clients": sorted(plan.clients), "one_sided": avg.one_sided, "refused": result.refused,
                  "doubtful": result.doubtful}
    except AveragingFailed as e:
        record = {"error": str(e), "peer": avg.peer_id}
    finally:
        # Leave only once every surviving worker is done: a member may still read from us.
        out.with_suffix(".done").touch()
        barrier(out.parent, ".done", alive, 120)
        traffic = avg.traffic()
        torch.save(dict(record, sent=traffic["bytes_sent"], received=traffic["bytes_received"]), out)
        avg.shutdown()
        dht.shutdown()


if __name__ == "__main__":
    main()
