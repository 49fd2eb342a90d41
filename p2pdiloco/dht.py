"""This peer's DHT node: starting and stopping it (and its ``p2pd`` daemon), hardening hivemind's
decoding of strangers' bytes, and keeping the node connected to the swarm.

What a run stores *in* the DHT (its records and the fork rule) is :mod:`p2pdiloco.swarm`.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from p2pdiloco.errors import SwarmError

log = logging.getLogger(__name__)


def validate_multiaddrs(addrs: Sequence[str]) -> list[str]:
    """Parse ``--peers`` values; raise a one-line :class:`SwarmError` for a malformed one."""
    from hivemind.utils.multiaddr import Multiaddr

    out = []
    for addr in addrs:
        try:
            parsed = Multiaddr(addr)
        except Exception:
            raise SwarmError(f"--peers '{addr}' is not a multiaddr: expected /ip4/HOST/tcp/PORT/p2p/PEER_ID") from None
        if "/p2p/" not in str(parsed):
            raise SwarmError(f"--peers '{addr}' lacks the peer id: expected /ip4/HOST/tcp/PORT/p2p/PEER_ID")
        out.append(str(parsed))
    return out


MAX_EXT_NESTING = 32  # msgpack ext values (tuples, hivemind's records) inside one another


def bound_msgpack_nesting() -> None:
    """Make hivemind's ``MSGPackSerializer.loads`` refuse ext values nested more than
    ``MAX_EXT_NESTING`` deep with a ``ValueError``, in this process and those it forks after.

    Why: hivemind decodes a tuple (and its own ext types) by calling ``msgpack.unpackb`` again
    from inside ``unpackb``, and each level puts msgpack's ~40 KB decoding context on the C
    stack. About 150 tuples in tuples (under 1 KB, from any stranger: a DHT value or subkey, a
    group's gathered metadata, a state header) overflow an 8 MB stack and the process dies of
    SIGSEGV; no Python limit applies. ``bench/fuzz.py``'s ``progress_bytes`` target found it.
    A ValueError is what hivemind already gets for any undecodable bytes. Idempotent.
    """
    import threading

    from hivemind.utils.serializer import MSGPackSerializer

    if getattr(MSGPackSerializer, "_p2pdiloco_bounded", False):
        return
    decode = MSGPackSerializer._decode_ext_types.__func__
    depth = threading.local()  # loads runs in several threads of the DHT and averager processes

    def bounded(cls, type_code: int, data: bytes):
        level = getattr(depth, "level", 0)
        if level >= MAX_EXT_NESTING:
            raise ValueError(f"msgpack ext values nested deeper than {MAX_EXT_NESTING}")
        depth.level = level + 1
        try:
            return decode(cls, type_code, data)
        finally:
            depth.level = level

    MSGPackSerializer._decode_ext_types = classmethod(bounded)
    MSGPackSerializer._p2pdiloco_bounded = True


def tolerate_undecodable_subkeys() -> None:
    """Make a DHT read drop the one subkey whose value cannot be decoded, not the whole key.

    Why: hivemind's ``_SearchState.finish_search`` decodes every subkey's value of a dictionary
    record with no ``try``; when one raises, the search's future is never set, so a single bad
    value from any stranger (stored under its own subkey of ``{run}_progress``) makes every
    peer's read of the whole key time out until that value expires: a cheap denial of service
    found by ``bench/fuzz.py``. On failure this decodes the subkeys one by one and keeps those
    that decode (a regular value that does not decode reads as absent). Idempotent.
    """
    from hivemind.dht.node import _SearchState
    from hivemind.dht.storage import DictionaryDHTValue
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import ValueWithExpiration

    if getattr(_SearchState, "_p2pdiloco_tolerant", False):
        return
    finish = _SearchState.finish_search

    def decode(state, subkey, value_bytes, expiration):
        if state.record_validator is not None:
            record = DHTRecord(state.key_id.to_bytes(), state.serializer.dumps(subkey), value_bytes, expiration)
            value_bytes = state.record_validator.strip_value(record)
        return ValueWithExpiration(state.serializer.loads(value_bytes), expiration)

    def finish_search(state):
        try:
            return finish(state)
        except Exception:
            if state.future.done():
                return
        if not isinstance(state.binary_value, DictionaryDHTValue):
            state.future.set_result(None)
            return
        kept = {}
        for subkey, (value_bytes, expiration) in state.binary_value.items():
            try:
                kept[subkey] = decode(state, subkey, value_bytes, expiration)
            except Exception:
                log.debug("dropped an undecodable DHT value under one subkey of %s", state.key_id)
        state.future.set_result(ValueWithExpiration(kept, state.expiration_time))

    _SearchState.finish_search = finish_search
    _SearchState._p2pdiloco_tolerant = True


def start_dht(
    initial_peers: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    public_host: str | None = None,
    identity: str | None = None,
    client_mode: bool = False,
    timeout: float = 30.0,
    nat: str | None = None,
    secret=None,
):
    """Start a hivemind DHT (a child process plus the ``p2pd`` daemon) and wait until it is ready.

    ``nat``: a resolved mode of :mod:`p2pdiloco.nat` (``local``, ``public``, ``client``, ``relay``;
    resolve ``auto`` first with :func:`p2pdiloco.nat.resolve`). None keeps the callers that do not
    choose on ``local`` (``public`` when ``public_host`` is given), so loopback runs and tests never
    probe a gateway, a relay or AutoNAT. ``client_mode`` forces a client DHT (``status``).
    ``secret``: a closed run's :class:`~p2pdiloco.auth.RunSecret`: this node MACs the records it
    stores and drops every record without a valid MAC (see :mod:`p2pdiloco.auth`).

    Raises :class:`SwarmError` with the cause and the fix when the port is taken, the identity
    is in use, or none of ``initial_peers`` can be reached within ``timeout`` seconds.
    """
    import hivemind

    from p2pdiloco import nat as nat_modes

    bound_msgpack_nesting()  # before the DHT (and later the averager) forks: both decode strangers' bytes
    tolerate_undecodable_subkeys()
    initial_peers = validate_multiaddrs(initial_peers)
    kwargs: dict[str, Any] = dict(host_maddrs=[f"/ip4/{host}/tcp/{port}"])
    kwargs.update(nat_modes.dht_options(nat or ("public" if public_host else "local")))
    kwargs["client_mode"] = kwargs["client_mode"] or client_mode
    if public_host:
        if not port:
            raise SwarmError("--public-host needs a fixed --port: others must know which port to dial")
        kwargs["announce_maddrs"] = [f"/ip4/{public_host}/tcp/{port}"]
    if identity:
        kwargs["identity_path"] = identity
    if secret is not None:
        kwargs["record_validators"] = [secret.validator()]
    dht = hivemind.DHT(initial_peers=initial_peers or None, start=False, **kwargs)
    try:
        dht.run_in_background(await_ready=True, timeout=timeout)
    except Exception as e:
        ensure_stopped(dht, timeout=0)  # a DHT that failed to start has nothing to shut down cleanly
        raise SwarmError(_explain_dht_failure(e, initial_peers, host, port, timeout)) from None
    if not kwargs["client_mode"]:
        try:  # so that volunteers can check that this node can dial them (see p2pdiloco.nat)
            dht.run_coroutine(nat_modes.serve_dialback, return_future=True).result(timeout=timeout)
        except Exception as e:
            log.warning("could not serve the dial-back check: %r", e)
    return dht


def ensure_stopped(process, timeout: float = 5.0) -> None:
    """SIGKILL a hivemind child process (DHT or averager) still alive ``timeout`` s after its shutdown.

    After a terminal's Ctrl+C has killed ``p2pd`` (SIGINT reaches the whole process group),
    hivemind's own shutdown can leave its child running, and Python's exit would wait on it forever.
    """
    import os
    import signal

    try:
        process.join(timeout)
        if process.is_alive():
            if timeout:
                log.warning("%s did not stop within %.0f s: killing it", type(process).__name__, timeout)
            os.kill(process.pid, signal.SIGKILL)
            process.join(5.0)  # SIGKILL cannot be ignored: this only waits for the kernel to reap it
    except (AssertionError, ValueError, ProcessLookupError):  # never started, or already reaped
        pass


def stop_dht(dht) -> None:
    """Stop the DHT process and its ``p2pd`` daemon, bounded in time."""
    try:
        dht.shutdown()
    except Exception as e:
        log.debug("DHT shutdown: %r", e)
    ensure_stopped(dht)


def _explain_dht_failure(err: Exception, peers: Sequence[str], host: str, port: int, timeout: float) -> str:
    text = str(err)
    if "already taken" in text:
        return "this identity file is in use by another running peer: give each peer its own --identity"
    if "address already in use" in text.lower() or "bind" in text.lower():
        return f"port {port} on {host} is already in use: choose another --port (or 0 for any free port)"
    if "bootstrap" in text.lower() or isinstance(err, TimeoutError) or "Timeout" in type(err).__name__:
        shown = ", ".join(peers[:3]) + (f" and {len(peers) - 3} more" if len(peers) > 3 else "")
        return (
            f"could not reach {shown} within {timeout:.0f} s: "
            "check the address, that the peer is running and that its port is reachable"
        )
    return f"the DHT failed to start: {type(err).__name__}: {text.splitlines()[0] if text else ''}"


def maddrs_of(dht) -> list[str]:
    return [str(m) for m in dht.get_visible_maddrs()]


async def _recontact(initial: list[str], known: list[str], timeout: float, _dht, node) -> tuple[list[str], int]:
    """Runs in the DHT process: dial and ping the initial peers, and when the routing table is
    empty, the peers it held before. Returns (peer ids in the table, dials made).

    A ping adds both sides to each other's routing table, which is all a DHT node needs to find
    the rest of the swarm again. Initial peers are pinged even while listed: a restarted
    coordinator is still listed by peers that never failed a request to it, yet knows nobody.
    """
    import asyncio

    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    me = node.peer_id.to_base58()
    present = {pid.to_base58() for pid in node.protocol.routing_table.uid_to_peer_id.values()}
    targets: dict[str, Multiaddr | None] = {}
    for addr in initial:
        maddr = Multiaddr(addr)
        pid = maddr["p2p"]
        if pid != me:
            targets[pid] = maddr.decapsulate(Multiaddr(f"/p2p/{pid}"))
    if not present:
        targets.update({pid: None for pid in known if pid not in targets and pid != me})

    async def dial(pid: str, maddr: Multiaddr | None) -> None:
        peer = PeerID.from_base58(pid)
        if maddr is not None:
            await node.p2p._client.connect(peer, [maddr])
        await node.protocol.call_ping(peer)

    # All at once, each bounded: a dead peer costs one timeout, not one per peer.
    await asyncio.gather(*(asyncio.wait_for(dial(p, m), timeout) for p, m in targets.items()), return_exceptions=True)
    return sorted(present), len(targets)


class RoutingWatchdog:
    """Keeps this peer's DHT connected to the swarm (hivemind does not do it by itself).

    A DHT node deletes every peer that fails one request, so a link that is down for a few
    seconds empties its routing table for good: hivemind pings the initial peers only at start.
    Likewise a restarted coordinator knows nobody, and peers that dropped it never dial it
    again, so newcomers bootstrapping through it would find an empty swarm. Every ``period_s``
    this thread pings the initial peers (one small request each), and, when the table is empty,
    every peer the table held before (the daemon remembers their addresses).
    """

    def __init__(self, dht, initial_peers: Sequence[str], period_s: float, timeout_s: float):
        import threading

        self.dht, self.initial, self.period_s, self.timeout_s = dht, list(initial_peers), period_s, timeout_s
        self.known: list[str] = []
        self.cut_off = False
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="dht-watchdog", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        import functools

        while not self.stopped.wait(self.period_s):
            task = functools.partial(_recontact, self.initial, self.known, self.timeout_s)
            try:
                present, dialled = self.dht.run_coroutine(task, return_future=True).result(timeout=2 * self.timeout_s)
            except Exception as e:  # the DHT is shutting down or busy: try again next tick
                log.debug("DHT watchdog: %r", e)
                continue
            if not present and not self.cut_off:
                log.warning("lost every DHT neighbour (network cut?): re-contacting %d peer(s) every %.0f s", dialled, self.period_s)
            elif present and self.cut_off:
                log.info("back in touch with the swarm's DHT (%d neighbour(s))", len(present))
            self.cut_off = not present
            if present:
                self.known = present

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=self.timeout_s * 2)


async def _ping_neighbours(timeout: float, _dht, node) -> int:
    import asyncio

    peers = list(node.protocol.routing_table.uid_to_peer_id.values())
    answers = await asyncio.gather(
        *(asyncio.wait_for(node.protocol.call_ping(peer), timeout) for peer in peers), return_exceptions=True
    )
    return sum(a is not None and not isinstance(a, BaseException) for a in answers)


def reachable_neighbours(dht, timeout: float) -> int:
    """How many of the DHT nodes this node knows answer a ping now (0 when its link is cut).

    The routing table alone is not enough: it keeps a node until a request to it fails, so for a
    few seconds after a cut it still lists peers that can no longer be reached.
    """
    import functools

    return dht.run_coroutine(functools.partial(_ping_neighbours, timeout / 2), return_future=True).result(timeout=timeout)
