"""How a peer takes part in the swarm's network: NAT modes and a dial-back reachability probe.

A peer of a run is one of:

``local``
    Loopback experiments and tests: a full peer, and libp2p never probes a gateway, a relay or
    AutoNAT (nothing leaves the machine).
``public``
    A full peer that others can dial (a public address, or a forwarded port announced with
    ``--public-host``). It reduces a slice of every round it is in and serves its state to
    newcomers. Its ``p2pd`` also relays for peers behind NAT (libp2p circuit relay) and answers
    their AutoNAT questions.
``client``
    Behind a NAT or firewall that nobody can dial: the peer only dials out. Its DHT is a client
    (others never add it to their routing tables) and its averager is a hivemind *client*: it
    sends its pseudo-gradient to the reducers of its group and receives the same averaged bytes
    as everyone else, but reduces no slice itself (peer fraction 0) and never serves its state.
    A round needs at least one reachable member, so a swarm of clients alone cannot average.
``relay``
    Behind NAT, but reachable through a libp2p circuit relay (by default the run's bootstrap
    peers, which must run in ``public`` mode). A full peer, whose traffic to the peers that cannot
    reach it directly goes through the relay. libp2p first tries a UPnP/NAT-PMP port mapping.
``auto``
    Picks one of the above from the listen address and, when it has to, from a dial-back probe
    (:func:`resolve`); ``join`` logs which mode it picked and why.

Why a probe of our own: hivemind's ``DHTProtocol.rpc_ping(validate=True)`` is meant to tell the
caller whether the callee can reach it (the callee pings it back and reports ``available``), but
under libp2p the ping back travels on the connection the caller just opened, so it answers
``available`` even for a peer that announces a port nobody can dial (checked with hivemind
1.1.12: a peer announcing a dead port got ``available=True``). And libp2p's AutoNAT verdict is
not exposed by the ``p2pd`` control API (identify, connect, list peers, streams: no
reachability). So every non-client p2pdiloco node serves :data:`DIALBACK_PROTOCOL`: asked by a
connected peer, it opens a *fresh* TCP connection to the IP address that peer's connection comes
from, at the port the peer names, and checks that a libp2p node answers there (the multistream
handshake). It dials no other address, so it cannot be used to probe third parties.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import socket
from typing import Any, Sequence

log = logging.getLogger(__name__)

MODES = ("auto", "local", "public", "client", "relay")
DIALBACK_PROTOCOL = "/p2pdiloco/dialback/1.0.0"
DIALBACK_TIMEOUT_S = 5.0  # the serving side's bound on one dial back (it is a courtesy to strangers)
DIALBACK_PARALLEL = 4  # dial-backs one node runs at once; more requests wait for a slot
_MULTISTREAM = b"/multistream/1.0.0\n"

# hivemind.DHT keyword arguments per mode. Only ``relay`` asks the gateway for a port mapping.
_DHT_OPTIONS: dict[str, dict[str, Any]] = {
    "local": dict(client_mode=False, use_relay=False, use_auto_relay=False, nat_port_map=False, auto_nat=False),
    "public": dict(client_mode=False, use_relay=True, use_auto_relay=False, nat_port_map=False, auto_nat=True),
    # The relay transport lets a client dial relay-mode peers through their circuit addresses.
    "client": dict(client_mode=True, use_relay=True, use_auto_relay=False, nat_port_map=False, auto_nat=False),
    "relay": dict(
        client_mode=False, use_relay=True, use_auto_relay=True, nat_port_map=True, auto_nat=True,
        force_reachability="private",  # we know we are behind NAT: reserve a relay slot at once
    ),
}


def dht_options(mode: str) -> dict[str, Any]:
    """The ``hivemind.DHT`` keyword arguments of a resolved mode (not ``auto``)."""
    try:
        return dict(_DHT_OPTIONS[mode])
    except KeyError:
        raise ValueError(f"unknown NAT mode '{mode}': use one of {', '.join(MODES)}") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


@dataclasses.dataclass(frozen=True)
class Choice:
    """A resolved NAT mode, why it was picked, and the listen/announce address to use with it."""

    mode: str
    reason: str
    port: int  # the port to listen on (a probe of port 0 pins the port it got)
    public_host: str | None = None


@dataclasses.dataclass
class DialBack:
    """One peer's answer to "can you dial me back?" (``reachable`` None: it could not tell)."""

    peer: str
    connected: bool  # a libp2p connection to this peer worked
    reachable: bool | None = None
    observed: str | None = None  # the IP address this peer sees our connection come from
    local: str | None = None  # our own source address on the way to this peer
    rtt_s: float | None = None
    detail: str = ""

    @property
    def behind_nat(self) -> bool | None:
        """True when the peer sees another address than the one we send from (address translation)."""
        if not self.observed or not self.local:
            return None
        return self.observed != self.local


@dataclasses.dataclass
class Probe:
    """What the initial peers told us about this machine's listen port."""

    port: int  # the TCP port that was probed
    answers: list[DialBack]
    announced: list[str]  # the addresses libp2p announces for us (identify)

    @property
    def reachable(self) -> bool | None:
        """True if a peer dialed us back, False if peers tried and failed, None if nobody could tell."""
        verdicts = [a.reachable for a in self.answers if a.reachable is not None]
        if any(verdicts):
            return True
        return False if verdicts else None

    @property
    def witness(self) -> DialBack | None:
        """The answer of a peer that dialed us back (else the first that saw our address)."""
        return next((a for a in self.answers if a.reachable), None) or next((a for a in self.answers if a.observed), None)


# ---------------------------------------------------------------- the serving side (DHT process)
async def serve_dialback(_dht, node) -> None:
    """Register the dial-back handler on this DHT node's ``p2pd`` (run with ``dht.run_coroutine``)."""
    from google.protobuf.wrappers_pb2 import BytesValue

    p2p = node.p2p
    slots = asyncio.Semaphore(DIALBACK_PARALLEL)

    async def handle(request: BytesValue, context) -> BytesValue:
        async with slots:
            answer = await _dial_back(p2p, context.remote_id, request.value)
        return BytesValue(value=json.dumps(answer).encode())

    await p2p.add_protobuf_handler(DIALBACK_PROTOCOL, handle, BytesValue)


async def _dial_back(p2p, remote_id, raw: bytes) -> dict:
    try:
        port = int(json.loads(raw.decode())["port"])
        if not 0 < port < 65536:
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError):
        return dict(error="malformed request: expected {\"port\": 1-65535}")
    observed = None
    for info in await p2p.list_peers():
        if info.peer_id == remote_id:
            observed = next((_ip_of(str(a)) for a in info.addrs if _ip_of(str(a))), None)
            break
    if observed is None:
        return dict(error="your connection reaches us through a relay or has no IP address: cannot dial it back")
    return dict(observed=observed, port=port, **await _libp2p_answers(observed, port, DIALBACK_TIMEOUT_S))


def _ip_of(maddr: str) -> str | None:
    """The IP address of a direct ``/ip4/…`` or ``/ip6/…`` multiaddr (None for relayed ones)."""
    parts = maddr.split("/")
    if "p2p-circuit" in parts or len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return None
    return parts[2]


async def _libp2p_answers(ip: str, port: int, timeout: float) -> dict:
    """Open a fresh TCP connection to ip:port and check that a libp2p node speaks there."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
        writer.write(bytes([len(_MULTISTREAM)]) + _MULTISTREAM)
        await writer.drain()
        header = await asyncio.wait_for(reader.readexactly(len(_MULTISTREAM) + 1), timeout)
        if header[1:] != _MULTISTREAM:
            return dict(reachable=False, detail=f"something answers at {ip}:{port}, but it is not a libp2p node")
        return dict(reachable=True, detail=f"dialed {ip}:{port} on a fresh connection")
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        return dict(reachable=False, detail=f"could not dial {ip}:{port} ({type(e).__name__}{': ' + str(e) if str(e) else ''})")
    finally:
        if writer is not None:
            writer.close()


# ---------------------------------------------------------------- the asking side
def local_source_address(ip: str) -> str | None:
    """The address this machine sends from to reach ``ip`` (a UDP connect sends no packet)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def probe(initial_peers: Sequence[str], host: str, port: int, timeout: float) -> Probe:
    """Listen on host:port with a throwaway ``p2pd``, ask each initial peer to dial us back, stop.

    Bounded by ``timeout`` in all (start, dials and dial-backs). Raises nothing for unreachable
    peers: their answers say so. Run it before the peer's own DHT binds the port.
    """
    return asyncio.run(asyncio.wait_for(_probe(list(initial_peers), host, port, timeout), timeout + 5))


async def _probe(initial_peers: list[str], host: str, port: int, timeout: float) -> Probe:
    import time

    from google.protobuf.wrappers_pb2 import BytesValue
    from hivemind.p2p import P2P, PeerID
    from hivemind.utils.multiaddr import Multiaddr

    started = time.monotonic()
    family = "ip6" if ":" in host else "ip4"
    p2p = await P2P.create(
        host_maddrs=[f"/{family}/{host}/tcp/{port}"], dht_mode="client", startup_timeout=timeout,
        use_relay=False, use_auto_relay=False, nat_port_map=False, auto_nat=False,
    )
    try:
        announced = [str(a) for a in await p2p.get_visible_maddrs()]
        listen_port = next(int(a.split("/tcp/")[1].split("/")[0]) for a in announced if "/tcp/" in a)

        async def ask(addr: str) -> DialBack:
            maddr = Multiaddr(addr)
            peer = maddr["p2p"]
            answer = DialBack(peer=addr, connected=False)
            ip = _ip_of(addr)
            answer.local = local_source_address(ip) if ip else None
            left = max(0.5, timeout - (time.monotonic() - started))
            try:
                t0 = time.monotonic()
                await asyncio.wait_for(p2p._client.connect(PeerID.from_base58(peer), [maddr.decapsulate(Multiaddr(f"/p2p/{peer}"))]), left)
                answer.connected, answer.rtt_s = True, time.monotonic() - t0
            except Exception as e:
                answer.detail = f"could not connect: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                return answer
            left = max(0.5, timeout - (time.monotonic() - started))
            try:
                request = BytesValue(value=json.dumps(dict(port=listen_port)).encode())
                reply = await asyncio.wait_for(
                    p2p.call_protobuf_handler(PeerID.from_base58(peer), DIALBACK_PROTOCOL, request, BytesValue), left
                )
                fields = json.loads(reply.value.decode())
            except asyncio.TimeoutError:
                answer.detail = f"no dial-back answer within {left:.0f} s"
                return answer
            except Exception as e:  # a plain hivemind node, or an older p2pdiloco: no such protocol
                answer.detail = f"this peer offers no dial-back check ({type(e).__name__}): it cannot tell"
                return answer
            if not isinstance(fields, dict):
                answer.detail = "malformed dial-back answer"
                return answer
            answer.observed = fields.get("observed") if isinstance(fields.get("observed"), str) else None
            reachable = fields.get("reachable")
            answer.reachable = reachable if isinstance(reachable, bool) else None
            answer.detail = str(fields.get("detail") or fields.get("error") or "")[:200]
            return answer

        answers = list(await asyncio.gather(*(ask(a) for a in initial_peers)))
        return Probe(port=listen_port, answers=answers, announced=announced)
    finally:
        await p2p.shutdown()


def _dials_only_loopback(addrs: Sequence[str]) -> bool:
    """True if every multiaddr names a loopback IP (a local swarm)."""
    for addr in addrs:
        ip = _ip_of(addr)
        if ip is None or not is_loopback(ip):
            return False
    return True


def resolve(
    mode: str,
    *,
    host: str,
    port: int,
    public_host: str | None,
    initial_peers: Sequence[str],
    timeout: float,
    probed: Probe | None = None,
) -> Choice:
    """Turn ``peer.nat`` into a concrete mode, with the reason, probing only when it must.

    ``auto``: listening on loopback is ``local`` for a local swarm, and ``client`` when an initial
    peer is on another machine (it could never dial us); ``--public-host`` means ``public``; the
    first peer of a run (no initial peers) is ``public`` (others must reach it); otherwise the
    initial peers are asked to dial this machine back (``probed``: an answer already obtained):
    reachable is ``public`` (announcing the address they saw when it is not the one we send from,
    i.e. a forwarded port), unreachable or unknown is ``client``. A full peer that others cannot
    dial would fail every round it reduces a slice in; a client works wherever the swarm has one
    reachable peer.
    """
    if mode not in MODES:
        raise ValueError(f"unknown NAT mode '{mode}': use one of {', '.join(MODES)}")
    if mode == "relay":
        return Choice(mode, "chosen with --nat (peer.nat); relay mode is untested across real NATs: if rounds with this "
                      "peer fail, join with --nat client", port, public_host)
    if mode != "auto":
        return Choice(mode, "chosen with --nat (peer.nat)", port, public_host)
    if is_loopback(host):
        if _dials_only_loopback(initial_peers):
            return Choice("local", f"listening on loopback ({host}): a local swarm, no gateway, relay or AutoNAT probing",
                          port, public_host)
        return Choice("client", f"listening on loopback ({host}) only, so the run's peers on other machines can never "
                      "dial this one: joining as a client (pass --host 0.0.0.0 and a fixed --port to serve as a full peer)",
                      port, None)
    if public_host:
        return Choice("public", f"--public-host {public_host} given: others dial that address", port, public_host)
    if not initial_peers:
        return Choice(
            "public", f"the first peer of a run must be reachable: others will dial {host}:{port or '(random port)'} "
            "(pass --public-host if they must use another address)", port, None,
        )
    result = probed
    if result is None:
        try:
            result = probe(initial_peers, host, port, timeout)
        except Exception as e:
            return Choice("client", f"the reachability probe failed ({type(e).__name__}: {e}): joining as a client "
                          "(pass --nat public if this machine is reachable)", port, None)
    if result.reachable:
        witness = result.witness
        # Seen from the peers at another address than the one we send from: a NAT with a
        # forwarded port. libp2p would announce our private addresses only: announce that one.
        announce = witness.observed if witness.behind_nat else None
        why = f"the initial peers dialed this machine back at {witness.observed}:{result.port}"
        if announce:
            why += f" (a forwarded port: announcing {announce}; pass --public-host to choose another)"
        return Choice("public", why, result.port, announce)
    if result.reachable is False:
        details = "; ".join(a.detail for a in result.answers if a.reachable is False)[:300]
        return Choice("client", f"no initial peer could dial this machine back on port {result.port} ({details}): "
                      "joining as a client (forward the port and pass --public-host to serve as a full peer)", port, None)
    details = "; ".join(a.detail for a in result.answers if a.detail)[:300]
    return Choice("client", f"no initial peer could check this machine's reachability ({details}): joining as a "
                  "client (pass --nat public if this machine is reachable)", port, None)
