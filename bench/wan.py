"""A wide-area network in user space, for benchmarks: rate and delay between network namespaces.

This kernel has no ``netem`` (see ../shared/reference/netem.md), so delay cannot be added with
``tc``. Instead one emulator process owns a TUN device per node: it creates ``p2pwN`` in its own
namespace, moves it into the node's namespace (the file descriptor stays with the emulator) and
gives it the address 10.78.0.N/24. Every IPv4 packet a node sends to another comes out of the
emulator's descriptor for that node and is written, later, into the destination's descriptor:

- each node has an upload and a download link of ``rate`` bit/s, modelled as FIFOs in virtual
  time (a packet leaves the uploader's queue, travels, then waits in the downloader's queue);
- each node adds ``delay`` seconds one way, so two nodes are ``2 * delay`` apart (as ``netem delay``
  on every host's egress would make them);
- a queue holding more than ``queue_s`` seconds of traffic drops the packet (drop-tail), as a
  router's buffer does, so TCP sees a real bottleneck.

``wan_namespaces`` sets such a network up (namespaces, addresses, the emulator) and tears it
down again; ``bench/heterogeneous.py wan`` runs whole peers in it. ``allreduce_over_wan`` runs
three averagers (``PseudoGradientAverager``, the real all-reduce) in three namespaces on such
links and times their rounds per codec. Needs root, ``ip`` and ``/dev/net/tun``.

    sudo .venv/bin/python bench/codecs.py netem      # the usual entry point
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import json
import os
import selectors
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

SUBNET = "10.78.0"
PORT = 31338
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


# ----------------------------------------------------------------------------- the emulator
def emulate(prefix: str, nodes: int, rate_bps: float, delay_s: float, queue_s: float, ready: Path) -> None:
    """Own one TUN per node namespace ``{prefix}N`` and forward packets between them (never returns)."""
    fds, node_of = {}, {}
    for n in range(1, nodes + 1):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        name = f"p2pw{n}"
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        _ip("link", "set", name, "netns", f"{prefix}{n}")
        _ip("-n", f"{prefix}{n}", "addr", "add", f"{SUBNET}.{n}/24", "dev", name)
        _ip("-n", f"{prefix}{n}", "link", "set", name, "up")
        fds[n], node_of[fd] = fd, n
    ready.write_text("ok")
    sel = selectors.DefaultSelector()
    for fd in fds.values():
        sel.register(fd, selectors.EVENT_READ)
    up_free = dict.fromkeys(fds, 0.0)  # when each node's upload queue is empty again
    down_free = dict.fromkeys(fds, 0.0)
    pending: list[tuple[float, int, int, bytes]] = []  # (deliver at, seq, node, packet)
    seq = 0
    prefix_bytes = bytes(int(x) for x in SUBNET.split("."))
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        for key, _ in sel.select(timeout):
            src = node_of[key.fd]
            while True:
                try:
                    packet = os.read(key.fd, 65536)
                except BlockingIOError:
                    break
                if len(packet) < 20 or packet[0] >> 4 != 4 or packet[16:19] != prefix_bytes:
                    continue  # only IPv4 inside the subnet travels
                dst = packet[19]
                if dst not in fds or dst == src:
                    continue
                now, seconds = time.monotonic(), len(packet) * 8 / rate_bps
                start = max(now, up_free[src])
                if start - now > queue_s:
                    continue  # upload buffer full: dropped
                up_free[src] = start + seconds
                arrive = up_free[src] + 2 * delay_s
                start = max(arrive, down_free[dst])
                if start - arrive > queue_s:
                    continue
                down_free[dst] = start + seconds
                seq += 1
                heapq.heappush(pending, (down_free[dst], seq, dst, packet))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, dst, packet = heapq.heappop(pending)
            try:
                os.write(fds[dst], packet)
            except OSError:
                pass  # the node's interface is down or its queue full: the packet is lost


# ----------------------------------------------------------------------------- one averager
def worker(rank: int, codec: str, values: int, rounds: int, out: Path) -> None:
    """Average a random ``values``-vector ``rounds`` times with the two other ranks; write the timings."""
    import logging

    import torch

    from p2pdiloco import dht as dht_node
    from p2pdiloco.averaging.front import PseudoGradientAverager
    from p2pdiloco.config import AveragingConfig
    from p2pdiloco.errors import AveragingFailed

    logging.basicConfig(level=logging.WARNING)
    addrs = out / f"{codec}.addrs"
    initial = [] if rank == 0 else _wait_for(lambda: addrs.exists() and addrs.read_text().split(), 120)
    dht = dht_node.start_dht(initial, host=f"{SUBNET}.{rank + 1}", port=PORT, timeout=120)
    if rank == 0:
        addrs.write_text(" ".join(dht_node.maddrs_of(dht)))
    cfg = AveragingConfig(matchmaking_s=10.0, request_s=5.0, allreduce_s=600.0, next_chunk_s=120.0, round_s=700.0)
    avg = PseudoGradientAverager(dht, values, prefix=f"wan_{codec}", cfg=cfg, compression=codec, target_group_size=3,
                                 min_group_size=3, state_fn=lambda: ({}, []))
    vector = torch.randn(values, generator=torch.Generator().manual_seed(rank)) * 1e-3
    results = []
    for r in range(rounds):
        _barrier(out, f"{codec}.r{r}", rank)
        try:
            res = avg.average(vector, epoch=r, state_hash="wan", weight=1.0, gather={}, expected_size=3)
            results.append(dict(ok=True, round=r, seconds=res.seconds, bytes_sent=res.bytes_sent, bytes_received=res.bytes_received,
                                encode_s=res.encode_s, decode_s=res.decode_s, group=len(res.group)))
        except AveragingFailed as e:
            results.append(dict(ok=False, round=r, error=str(e)))
    _barrier(out, f"{codec}.done", rank)  # nobody stops its p2pd while another still reads from it
    (out / f"{codec}.{rank}.json").write_text(json.dumps(results))
    avg.shutdown()
    dht.shutdown()


def _wait_for(condition, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError("the other averagers did not come up")
        time.sleep(0.1)
    return value


def _barrier(out: Path, name: str, rank: int, parties: int = 3) -> None:
    (out / f"{name}.{rank}.ready").touch()
    _wait_for(lambda: len(list(out.glob(f"{name}.*.ready"))) >= parties, 900)


# ----------------------------------------------------------------------------- namespaces + emulator
@contextlib.contextmanager
def wan_namespaces(nodes: int, rate_bps: float, delay_s: float, out: Path, queue_s: float = 0.5) -> Iterator[list[str]]:
    """Network namespaces ``{prefix}1`` .. ``{prefix}N`` joined by the emulator; yields their names.

    Node ``n`` (1-based) has the address ``10.78.0.n`` in namespace ``names[n - 1]``; every packet
    between two nodes crosses the emulator (``rate_bps`` each way per node, ``delay_s`` one way per
    node: ``2 * delay_s`` between two nodes). On exit, also on an exception or Ctrl+C, the emulator
    is killed, every process still inside a namespace is killed (by pid, as ``ip netns pids`` lists
    them) and the namespaces are deleted. ``out`` holds the emulator's ready-file.
    """
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists():
        raise SystemExit("the WAN emulation needs root and /dev/net/tun (network namespaces and TUN devices)")
    prefix = f"p2pw{os.getpid() % 100000}n"
    namespaces = [f"{prefix}{n}" for n in range(1, nodes + 1)]
    emulator = None
    try:
        for ns in namespaces:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        ready = out / "emulator.ready"
        ready.unlink(missing_ok=True)
        emulator = subprocess.Popen(
            [sys.executable, __file__, "emulate", prefix, str(nodes), str(rate_bps), str(delay_s), str(ready), str(queue_s)],
            start_new_session=True,
        )
        _wait_for(lambda: ready.exists() or emulator.poll() is not None, 30)
        if emulator.poll() is not None:
            raise SystemExit("the WAN emulator failed to start")
        yield namespaces
    finally:
        if emulator is not None and emulator.poll() is None:
            os.killpg(emulator.pid, signal.SIGKILL)
            emulator.wait()
        for ns in namespaces:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# ----------------------------------------------------------------------------- the benchmark
def allreduce_over_wan(codecs: list[str], *, values: int, rate_bps: float, delay_s: float, rounds: int, out: Path) -> dict:
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists():
        raise SystemExit("the netem part needs root and /dev/net/tun (network namespaces and TUN devices)")
    out = out.resolve() / "wan"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        stale.unlink()
    rows = {}
    with wan_namespaces(3, rate_bps, delay_s, out) as namespaces:
        for codec in codecs:
            print(f"{codec}: averaging {values / 1e6:.0f}M values x {rounds} rounds ...", flush=True)
            procs = [subprocess.Popen(["ip", "netns", "exec", namespaces[rank], sys.executable, __file__, "worker", str(rank),
                                       codec, str(values), str(rounds), str(out)], start_new_session=True)
                     for rank in range(3)]
            try:
                for p in procs:
                    p.wait(timeout=rounds * 700 + 300)
            finally:
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()
            results = [json.loads((out / f"{codec}.{rank}.json").read_text()) for rank in range(3)
                       if (out / f"{codec}.{rank}.json").exists()]
            # The first round also dials the other members and looks them up in the DHT over the
            # slow links: reported apart ("cold"), the median is over the later rounds.
            first = sorted(r["seconds"] for rs in results for r in rs if r["ok"] and r["round"] == 0)
            ok = [r for rs in results for r in rs if r["ok"] and r["round"] > 0]
            seconds = sorted(r["seconds"] for r in ok)
            rows[codec] = dict(
                seconds=seconds[len(seconds) // 2] if seconds else float("nan"), rounds_ok=len(ok),
                first_round_s=first[len(first) // 2] if first else float("nan"),
                rounds_failed=sum(not r["ok"] for rs in results for r in rs),
                bytes_sent=sorted(r["bytes_sent"] for r in ok)[len(ok) // 2] if ok else 0,
                encode_s=sorted(r["encode_s"] for r in ok)[len(ok) // 2] if ok else 0.0,
                decode_s=sorted(r["decode_s"] for r in ok)[len(ok) // 2] if ok else 0.0,
            )
            print(f"  median {rows[codec]['seconds']:.2f} s over {len(ok)} peer-rounds", flush=True)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    command, *rest = sys.argv[1:]
    if command == "emulate":
        prefix, nodes, rate, delay, ready, *queue = rest
        emulate(prefix, int(nodes), float(rate), float(delay), queue_s=float(queue[0]) if queue else 0.5, ready=Path(ready))
    elif command == "worker":
        rank, codec, values, rounds, out = rest
        worker(int(rank), codec, int(values), int(rounds), Path(out))
    else:
        raise SystemExit(f"unknown command {command}")
