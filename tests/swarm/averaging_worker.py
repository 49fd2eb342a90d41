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

Closed runs: ``AVG_SECRET`` is the run secret of a member. ``AVG_OUTSIDER=1`` makes the worker an
outsider that knows p2pdiloco's formats but not the secret: its DHT strips the members' record
MACs without checking them (so it sees their matchmaking declarations) and signs its own with
zeros, and its metadata carries a forged membership proof.
"""

import logging
import os
import sys
import time
from pathlib import Path

import torch
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from p2pdiloco import auth
from p2pdiloco import dht as dht_node
from p2pdiloco.averaging.front import PseudoGradientAverager
from p2pdiloco.config import AggregationConfig, AveragingConfig
from p2pdiloco.errors import AveragingFailed

SIZE = 2_200_000  # at least 3 parts of ~512 KB with every codec, so every member reduces a slice


class Forger(RecordValidatorBase):
    """An outsider's validator: reads members' records by dropping their MAC unchecked, and
    "signs" its own with zeros (auth.RecordMAC's layout, a wrong MAC)."""

    SUFFIX = len(auth._MAC_MAGIC) + 32

    def validate(self, record: DHTRecord) -> bool:
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value + auth._MAC_MAGIC + bytes(32)

    def strip_value(self, record: DHTRecord) -> bytes:
        value = record.value
        return value[: -self.SUFFIX] if value[-self.SUFFIX : -32] == auth._MAC_MAGIC else value

    @property
    def priority(self) -> int:
        return 1000


class OutsiderDHTSecret:
    """Stands in for a RunSecret in p2pdiloco.dht.start_dht: hands it the forging validator."""

    def validator(self):
        return Forger()


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
    outsider = os.environ.get("AVG_OUTSIDER") == "1"
    secret = auth.RunSecret(os.environ["AVG_SECRET"].encode()) if os.environ.get("AVG_SECRET") and not outsider else None
    dht = dht_node.start_dht(peers, secret=OutsiderDHTSecret() if outsider else secret)
    print(dht_node.maddrs_of(dht)[0], flush=True)
    # Generous limits: CI machines are shared, and this test checks the protocol, not the timeouts
    # (a round that times out here would fail the test on a slow machine, not on a broken protocol).
    # AVG_MATCHMAKING_S shortens the wait for tests whose retries look for a group without a banned peer.
    cfg = AveragingConfig(matchmaking_s=float(os.environ.get("AVG_MATCHMAKING_S", "10")), request_s=3.0, allreduce_s=60.0,
                          next_chunk_s=30.0, round_s=90.0)
    avg = PseudoGradientAverager(
        dht, SIZE, prefix="avgtest", cfg=cfg, compression=compression, target_group_size=4, min_group_size=3,
        state_fn=lambda: ({}, []), error_feedback=compression != "none", aggregation=aggregation,
        secret=secret,
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
                forged = {"member": os.urandom(auth.TOKEN_BYTES)} if outsider else {}
                result = avg.average(vector, epoch=7, state_hash="same", weight=weight, gather={"rank": rank, **forged},
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
