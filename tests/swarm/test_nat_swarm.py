"""Peers behind NAT: a client-mode peer in the consistent all-reduce, and the dial-back probe.

A client-mode peer (``--nat client``) dials out only: hivemind gives it a peer fraction of 0, so it
sends its pseudo-gradient to the reducers and decodes the same averaged bytes as everyone, but
reduces no slice, and it never serves its state (nobody can dial it).
"""

import functools

import pytest

from tests.swarm.conftest import LocalSwarm

pytestmark = pytest.mark.swarm

ROUNDS_OF_THREE = 3


def _outer_steps(swarm: LocalSwarm, index: int, group_size: int) -> list[dict]:
    return [r for r in swarm.metrics(index) if r.get("event") == "outer_step" and r["group_size"] == group_size]


def _peer_id(swarm: LocalSwarm, index: int) -> str:
    return swarm.metrics(index)[0]["peer"]


@pytest.fixture(scope="module")
def client_run(tmp_path_factory, data_cache):
    """A normal peer and a client-mode peer train; a second normal peer joins once both reached
    epoch 1 (it must download the state from the normal one; it is also given the coordinator's
    --addrs-file as --peers); all stop (SIGTERM) once the three
    averaged together ROUNDS_OF_THREE times."""
    swarm = LocalSwarm(tmp_path_factory.mktemp("nat-client"), data_cache)
    try:
        swarm.add_peer(1000)
        swarm.add_peer(1000, "--nat", "client")
        swarm.wait_until(lambda: swarm.epoch(0) >= 1 and swarm.epoch(1) >= 1, 240, "the normal and the client peer to reach epoch 1")
        swarm.add_peer(1000, "--peers", str(swarm.out / "coordinator.addrs"))  # also a file of multiaddrs
        swarm.wait_until(lambda: len(_outer_steps(swarm, 1, 3)) >= ROUNDS_OF_THREE, 240, "the client to average in groups of 3")
        codes = [peer.stop(grace=30) for peer in swarm.peers]
    finally:
        swarm.stop()
    return swarm, codes


def test_client_mode_peer_averages_and_holds_the_same_state(client_run):
    swarm, codes = client_run
    assert codes == [0, 0, 0], "a peer did not exit cleanly on SIGTERM"
    assert "network mode: client" in (swarm.out / "peer1.log").read_text()
    assert "network mode: local" in (swarm.out / "peer0.log").read_text()
    swarm.assert_consistent(range(3))
    shared = [e for e, by_peer in swarm.states_by_epoch(range(3)).items() if len(by_peer) == 3]
    assert len(shared) >= ROUNDS_OF_THREE, "the three peers never held a common epoch"
    client = _peer_id(swarm, 1)
    for i in (0, 2):
        assert any(client in r["group"] for r in _outer_steps(swarm, i, 3)), f"peer {i} never averaged with the client"


def test_client_mode_peer_reduces_no_slice(client_run):
    swarm, _ = client_run
    # A client sends its whole vector (to the reducers) and receives the whole average, in every
    # group: exactly one vector each way per round. In a group of 3 with 2 reducers, a reducer
    # sends the half the other reduces and the average of its own half to both others: 1.5
    # vectors a round (its last replies may count in its next round: compare sums over rounds).
    client = _outer_steps(swarm, 1, 3) + _outer_steps(swarm, 1, 2)
    vector = client[0]["bytes_sent"]
    for r in client:
        assert abs(r["bytes_sent"] - vector) < 0.01 * vector and abs(r["bytes_received"] - vector) < 0.01 * vector, r
    reducers = [r for i in (0, 2) for r in _outer_steps(swarm, i, 3)]
    per_round = sum(r["bytes_sent"] for r in reducers) / len(reducers)
    assert per_round > 1.2 * vector, (per_round, vector)


def test_newcomer_downloads_from_a_reachable_peer_never_the_client(client_run):
    swarm, _ = client_run
    first = swarm.metrics(2)[0]
    assert first["event"] == "downloaded", first
    assert first["donor"] == _peer_id(swarm, 0), f"the newcomer took its state from {first['donor']}, not the normal peer"


# ---------------------------------------------------------------- the dial-back probe
def _plain_hivemind_dht():
    """A stock hivemind DHT node, as ``hivemind-dht`` runs one: it serves no dial-back."""
    import hivemind

    return hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True, use_relay=False, use_auto_relay=False,
                        nat_port_map=False, auto_nat=False)


def test_probe_through_a_p2pdiloco_node_dials_back(tmp_path):
    from p2pdiloco import nat
    from p2pdiloco.dht import maddrs_of, start_dht, stop_dht

    dht = start_dht()
    try:
        addrs = maddrs_of(dht)
        result = nat.probe(addrs, "127.0.0.1", 0, timeout=20)
    finally:
        stop_dht(dht)
    assert result.reachable is True, result
    (answer,) = result.answers
    assert answer.connected and answer.observed == "127.0.0.1" and answer.behind_nat is False, answer
    choice = nat.resolve("auto", host="0.0.0.0", port=0, public_host=None, initial_peers=addrs, timeout=20, probed=result)
    assert choice.mode == "public" and choice.port == result.port and choice.public_host is None, choice


def test_probe_through_a_plain_hivemind_node_cannot_tell_and_auto_joins_as_client():
    from p2pdiloco import nat
    from p2pdiloco.dht import maddrs_of, stop_dht

    dht = _plain_hivemind_dht()
    try:
        addrs = maddrs_of(dht)
        result = nat.probe(addrs, "127.0.0.1", 0, timeout=20)
    finally:
        stop_dht(dht)
    (answer,) = result.answers
    assert answer.connected and answer.reachable is None and "cannot tell" in answer.detail, answer
    choice = nat.resolve("auto", host="0.0.0.0", port=0, public_host=None, initial_peers=addrs, timeout=20, probed=result)
    assert choice.mode == "client", choice


async def _validate_ping(target, _dht, node) -> bool:
    from hivemind.proto import dht_pb2

    request = dht_pb2.PingRequest(peer=node.protocol.node_info, validate=True)
    return (await node.protocol.get_stub(target).rpc_ping(request, timeout=10)).available


def test_hivemind_validate_ping_cannot_detect_an_unreachable_peer():
    """Why p2pdiloco has a dial-back of its own: hivemind's ``validate`` ping answers through the
    connection the caller opened, so a peer announcing a port nobody listens on is "available"."""
    import hivemind
    from hivemind.p2p import PeerID

    from p2pdiloco.dht import maddrs_of, stop_dht

    server = _plain_hivemind_dht()
    caller = None
    try:
        addr = maddrs_of(server)[0]
        caller = hivemind.DHT(initial_peers=[addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], announce_maddrs=["/ip4/127.0.0.1/tcp/9"],
                              start=True, use_relay=False, use_auto_relay=False, nat_port_map=False, auto_nat=False)
        target = PeerID.from_base58(addr.split("/p2p/")[1])
        assert caller.run_coroutine(functools.partial(_validate_ping, target)) is True
    finally:
        if caller is not None:
            stop_dht(caller)
        stop_dht(server)
