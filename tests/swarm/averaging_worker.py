"""A process that averages one random vector with its group (used by test_averaging.py).

    python averaging_worker.py OUT_FILE RANK COMPRESSION [INITIAL_PEER...]

Writes the averaged vector, the round's metadata and its traffic to OUT_FILE (torch.save), or
{"error": ...} if the round failed. Prints its multiaddr on stdout first, so a test can start the
others with it.
"""

import logging
import sys
import time
from pathlib import Path

import torch

from p2pdiloco import swarm
from p2pdiloco.averaging import PseudoGradientAverager
from p2pdiloco.config import AveragingConfig
from p2pdiloco.errors import AveragingFailed

SIZE = 2_200_000  # at least 3 parts of ~512 KB with every codec, so every member reduces a slice


def main() -> None:
    # Why a member dropped out of the round is logged at DEBUG; show it in the test's output.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("p2pdiloco").setLevel(logging.DEBUG)
    out, rank, compression, *peers = sys.argv[1:]
    rank = int(rank)
    dht = swarm.start_dht(peers)
    print(swarm.maddrs_of(dht)[0], flush=True)
    # Generous limits: CI machines are shared, and this test checks the protocol, not the timeouts
    # (a round that times out here would fail the test on a slow machine, not on a broken protocol).
    cfg = AveragingConfig(matchmaking_s=10.0, request_s=3.0, allreduce_s=60.0, next_chunk_s=30.0, round_s=90.0)
    avg = PseudoGradientAverager(
        dht, SIZE, prefix="avgtest", cfg=cfg, compression=compression, target_group_size=4, min_group_size=3,
        state_fn=lambda: ({}, []), error_feedback=compression != "none",
    )
    # Barrier: start the round only once all three averagers are up, however slow the machine.
    ready = Path(out).with_suffix(".ready")
    ready.touch()
    deadline = time.monotonic() + 120
    while len(list(ready.parent.glob("*.ready"))) < 3:
        assert time.monotonic() < deadline, "the other workers never came up"
        time.sleep(0.1)
    gen = torch.Generator().manual_seed(rank)
    vector = torch.randn(SIZE, generator=gen) * (rank + 1)
    record = {}
    try:
        result = avg.average(vector, epoch=7, state_hash="same", weight=rank + 1, gather={"rank": rank}, expected_size=3)
        record = {"input": vector, "average": result.average, "group": result.group, "encode_s": result.encode_s,
                  "decode_s": result.decode_s, "residual": result.residual}
    except AveragingFailed as e:
        record = {"error": str(e)}
    finally:
        # A member that finished first must not stop its p2pd while a slower one still reads the
        # last averaged part from it (that member's round would fail): wait for all to finish.
        Path(out).with_suffix(".done").touch()
        deadline = time.monotonic() + 120
        while len(list(ready.parent.glob("*.done"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        # Bytes once every member is done: a reducer's last replies may leave after its own result.
        traffic = avg.traffic()
        torch.save(dict(record, sent=traffic["bytes_sent"], received=traffic["bytes_received"]), out)
        avg.shutdown()
        dht.shutdown()


if __name__ == "__main__":
    main()
