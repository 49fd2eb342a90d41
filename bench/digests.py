"""Reproducible state digests of a 3-peer run: the check that a restructuring changed no behaviour.

    python bench/digests.py OUT [--keys KEYS] [--repo CHECKOUT] [--epochs 4]

Starts a coordinator and three ``p2pdiloco join`` peers of ``configs/test.toml`` on loopback and
prints, per epoch, each peer's event and state digest. Run it on two checkouts (``--repo``) with
the same ``--keys`` folder and compare the tables: identical digests mean the two versions
computed the same bytes at every epoch.

Why not plain ``simulate``: its digests differ from run to run even on one version. Three things
make them reproducible here, none of which changes what is computed, only when:

- fixed peer identities (``KEYS/peerN.key``, created on the first run): the peer id picks the
  data shard and the batch order;
- lock-step rounds of all three (``run.overlap=false``, ``run.dynamic_local_updates=false``,
  ``run.min_group_size=3``, long grace and heartbeat): a peer's step count does not depend on
  timing, and every round holds everyone. Each peer also freezes itself (``P2PDILOCO_FAULT=
  inner:stop@1``) at its first inner step and is resumed once all three are frozen, so the first
  round cannot start before the third peer has published its record;
- ``run.aggregation.method=trimmed_mean`` with ``trim=0``: the plain mean, computed over the
  values sorted per coordinate. hivemind's reducer sums parts in their order of arrival, and a
  float sum of three terms depends on its order: with ``mean`` the digests of epoch 2 on already
  differ between two runs of the same code.

``--repo`` runs another checkout's code with this interpreter (its ``p2pdiloco`` package is found
first because the peers start with that checkout as their working directory).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = [
    "run.overlap=false", "run.dynamic_local_updates=false", "run.min_group_size=3", "run.averaging.grace_s=60",
    "run.averaging.round_s=60", "peer.heartbeat_s=20", "run.aggregation.method=trimmed_mean", "run.aggregation.trim=0",
]


def frozen(proc: subprocess.Popen) -> bool:
    """Whether the process is stopped (SIGSTOP): the state letter of /proc/PID/stat."""
    return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def start(args: list[str], log: Path, repo: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=repo, env=env)


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for logs and metrics (emptied first)")
    parser.add_argument("--keys", type=Path, default=None, help="peer identity files, shared between runs (default: OUT/keys)")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1], help="the checkout to run")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the peers are killed")
    a = parser.parse_args()
    out, repo = a.out.resolve(), a.repo.resolve()
    keys = (a.keys or out / "keys").resolve()
    out.mkdir(parents=True, exist_ok=True)
    keys.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.*"):
        old.unlink()
    cli = [sys.executable, "-m", "p2pdiloco"]
    addrs = out / "coordinator.addrs"
    coordinator = start([*cli, "coordinator", "--port", "0", "--identity", str(keys / "coordinator.key"),
                         "--addrs-file", str(addrs)], out / "coordinator.log", repo)
    peers: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 120
        while not (addrs.exists() and addrs.read_text().strip()):  # written once the coordinator is up
            if coordinator.poll() is not None or time.monotonic() > deadline:
                print(f"the coordinator did not start: see {out / 'coordinator.log'}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        env = dict(os.environ, P2PDILOCO_FAULT="inner:stop@1")
        for i in range(3):
            args = [*cli, "join", str(repo / "configs" / "test.toml"), "--max-epochs", str(a.epochs), "--peers", str(addrs),
                    "--identity", str(keys / f"peer{i}.key"), "--metrics-file", str(out / f"peer{i}.jsonl")]
            for item in SETTINGS + ([] if i == 0 else ["peer.eval_every=0"]):
                args += ["--set", item]
            peers.append(start(args, out / f"peer{i}.log", repo, env))
        deadline = time.monotonic() + a.timeout
        while not all(frozen(p) for p in peers):  # each stops itself at its first inner step
            if any(p.poll() is not None for p in peers) or time.monotonic() > deadline:
                print(f"a peer exited or never reached its first step: see {out}/peer*.log", file=sys.stderr)
                return 1
            time.sleep(0.2)
        for p in peers:
            stop(p, signal.SIGCONT)
        codes = [p.wait(max(1.0, deadline - time.monotonic())) for p in peers]
    finally:
        for p in [*peers, coordinator]:
            stop(p, signal.SIGKILL)
            p.wait()
    table: dict[int, dict[int, tuple]] = {}
    for i in range(3):
        for line in (out / f"peer{i}.jsonl").read_text().splitlines():
            r = json.loads(line)
            table.setdefault(r["epoch"], {})[i] = (r["event"], r["state_hash"][:16], r.get("group_size"))
    print("exit codes", codes)
    for epoch in sorted(table):
        print(epoch, table[epoch])
    return 0 if codes == [0, 0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
