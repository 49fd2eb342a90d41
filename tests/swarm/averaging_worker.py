"""A process that averages one random vector with its group (used by test_averaging.py).

    python averaging_worker.py OUT_FILE RANK COMPRESSION [INITIAL_PEER...]

Writes the averaged vector, the round's metadata and its traffic to OUT_FILE (torch.save), or
{"error": ...} if the round failed. Prints its multiaddr on stdout first, so a test can start the
others with it.

The environment shapes the group (test_robust.py): ``AVG_WORKERS`` (3) workers wait for each
other; ``AVG_AGGREGATION`` names the reducers' rule (``mean``); ``AVG_CORRELATED=1`` gives every
worker weight 1 and a vector ``common + 0.3 noise`` (pseudo-gradients of one swarm point the same
way), so an honest average exists to compare a robust one with. ``P2PDILOCO_FAULT`` makes a
worker hostile (``send:scale@1``).
"""

import logging
import os
import sys
import time
from pathlib import Path

import torch

from p2pdiloco import swarm
from p2pdiloco.averaging import PseudoGradientAverager
from p2pdiloco.config import AggregationConfig, AveragingConfig
from p2pdiloco.errors import AveragingFailed

SIZE = 2_200_000  # at least 3 parts of ~512 KB with every codec, so every member reduces a slice


def main() -> None:
    # Why a member dropped out of the round is logged at DEBUG; show it in the test's output.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("p2pdiloco").setLevel(logging.DEBUG)
    out, rank, compression, *peers = sys.argv[1:]
    rank = int(rank)
    workers = int(os.environ.get("AVG_WORKERS", "3"))
    aggregation = AggregationConfig(method=os.environ.get("AVG_AGGREGATION", "mean"))
    correlated = os.environ.get("AVG_CORRELATED") == "1"
    attempts = int(os.environ.get("AVG_ATTEMPTS", "1"))  # a peer's loop retries a failed round
    dht = swarm.start_dht(peers)
    print(swarm.maddrs_of(dht)[0], flush=True)
    # Generous limits: CI machines are shared, and this test checks the protocol, not the timeouts
    # (a round that times out here would fail the test on a slow machine, not on a broken protocol).
    cfg = AveragingConfig(matchmaking_s=10.0, request_s=3.0, allreduce_s=60.0, next_chunk_s=30.0, round_s=90.0)
    avg = PseudoGradientAverager(
        dht, SIZE, prefix="avgtest", cfg=cfg, compression=compression, target_group_size=4, min_group_size=3,
        state_fn=lambda: ({}, []), error_feedback=compression != "none", aggregation=aggregation,
    )
    # Barrier: start the round only once all three averagers are up, however slow the machine.
    ready = Path(out).with_suffix(".ready")
    ready.touch()
    deadline = time.monotonic() + 120
    while len(list(ready.parent.glob("*.ready"))) < workers:
        assert time.monotonic() < deadline, "the other workers never came up"
        time.sleep(0.1)
    gen = torch.Generator().manual_seed(rank)
    if correlated:
        vector, weight = torch.randn(SIZE, generator=torch.Generator().manual_seed(1234)) + 0.3 * torch.randn(SIZE, generator=gen), 1
    else:
        vector, weight = torch.randn(SIZE, generator=gen) * (rank + 1), rank + 1
    record, failures = {}, []
    try:
        for attempt in range(attempts):
            try:
                result = avg.average(vector, epoch=7, state_hash="same", weight=weight, gather={"rank": rank},
                                     expected_size=workers - len(avg.banned()))
                break
            except AveragingFailed as e:
                failures.append(str(e))
                if attempt == attempts - 1:
                    raise
        record = {"failures": failures, "banned": avg.banned(), "input": vector, "average": result.average, "group": result.group, "encode_s": result.encode_s,
                  "decode_s": result.decode_s, "residual": result.residual, "flagged": result.flagged,
                  "peer": avg.peer_id, "seconds": result.seconds}
    except AveragingFailed as e:
        record = {"error": str(e), "failures": failures, "peer": avg.peer_id}
    finally:
        # A member that finished first must not stop its p2pd while a slower one still reads the
        # last averaged part from it (that member's round would fail): wait for all to finish.
        Path(out).with_suffix(".done").touch()
        deadline = time.monotonic() + 120
        while len(list(ready.parent.glob("*.done"))) < workers and time.monotonic() < deadline:
            time.sleep(0.1)
        # Bytes once every member is done: a reducer's last replies may leave after its own result.
        traffic = avg.traffic()
        torch.save(dict(record, sent=traffic["bytes_sent"], received=traffic["bytes_received"]), out)
        avg.shutdown()
        dht.shutdown()


if __name__ == "__main__":
    main()
