"""NAT modes: what ``--nat auto`` picks and why, the DHT flags of each mode, the dial-back's verdicts."""

import asyncio

import pytest

from p2pdiloco import nat
from p2pdiloco.config import load_recipe

REMOTE = "/ip4/198.51.100.7/tcp/31337/p2p/12D3KooWBmwkafWE2fqfzS96VoTZhvcXJaT1PJ4wrnLTzPPqGqGu"
LOCAL = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWBmwkafWE2fqfzS96VoTZhvcXJaT1PJ4wrnLTzPPqGqGu"


@pytest.fixture(autouse=True)
def no_network_probe(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("this decision must not probe the network")

    monkeypatch.setattr(nat, "probe", refuse)


def _resolve(host="0.0.0.0", port=31338, public_host=None, peers=(REMOTE,), probed=None, mode="auto"):
    return nat.resolve(mode, host=host, port=port, public_host=public_host, initial_peers=list(peers), timeout=1, probed=probed)


def test_loopback_runs_never_probe_and_keep_every_gateway_probe_off():
    choice = _resolve(host="127.0.0.1", port=0, peers=(LOCAL,))
    assert choice.mode == "local" and "loopback" in choice.reason
    assert nat.dht_options("local") == dict(client_mode=False, use_relay=False, use_auto_relay=False,
                                            nat_port_map=False, auto_nat=False)


def test_loopback_listener_with_remote_peers_joins_as_client():
    choice = _resolve(host="127.0.0.1", peers=(REMOTE,))
    assert choice.mode == "client" and "--host 0.0.0.0" in choice.reason


def test_public_host_means_public():
    choice = _resolve(public_host="203.0.113.9")
    assert choice.mode == "public" and choice.public_host == "203.0.113.9"


def test_first_peer_of_a_run_is_public():
    assert _resolve(peers=()).mode == "public"


def test_an_explicit_mode_is_kept():
    for mode in ("public", "client", "relay", "local"):
        choice = _resolve(mode=mode)
        assert choice.mode == mode and "--nat" in choice.reason


def _probe(**answer):
    return nat.Probe(port=31338, answers=[nat.DialBack(peer=REMOTE, connected=True, **answer)], announced=[])


def test_dialed_back_through_a_forwarded_port_announces_the_observed_address():
    choice = _resolve(probed=_probe(reachable=True, observed="198.51.100.20", local="10.0.0.5"))
    assert choice.mode == "public" and choice.public_host == "198.51.100.20" and choice.port == 31338


def test_dialed_back_without_nat_keeps_libp2p_addresses():
    choice = _resolve(probed=_probe(reachable=True, observed="198.51.100.20", local="198.51.100.20"))
    assert choice.mode == "public" and choice.public_host is None


def test_not_dialed_back_joins_as_client():
    choice = _resolve(probed=_probe(reachable=False, observed="198.51.100.20", local="10.0.0.5", detail="refused"))
    assert choice.mode == "client" and "refused" in choice.reason


def test_nobody_could_tell_joins_as_client():
    choice = _resolve(probed=_probe(reachable=None, detail="this peer offers no dial-back check"))
    assert choice.mode == "client" and "no dial-back" in choice.reason


def test_modes_and_dht_options_agree_with_the_config():
    from typing import get_args

    from p2pdiloco.config import PeerConfig

    assert set(get_args(PeerConfig.model_fields["nat"].annotation)) == set(nat.MODES)
    assert load_recipe("test").peer.nat == "auto"
    assert nat.dht_options("client")["client_mode"] is True
    relay = nat.dht_options("relay")
    assert relay["use_auto_relay"] and relay["use_relay"] and not relay["client_mode"]
    with pytest.raises(ValueError, match="unknown NAT mode"):
        nat.dht_options("auto")


def test_relayed_or_named_addresses_have_no_ip():
    assert nat._ip_of("/ip4/1.2.3.4/tcp/5") == "1.2.3.4"
    assert nat._ip_of("/ip4/1.2.3.4/tcp/5/p2p/X/p2p-circuit") is None
    assert nat._ip_of("/dns4/example.org/tcp/5") is None


async def _serve(reply: bytes | None):
    async def handle(reader, writer):
        if reply is not None:
            await reader.read(1)
            writer.write(reply)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("reply,reachable,words", [
    (b"\x13/multistream/1.0.0\n", True, "fresh connection"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", False, "not a libp2p node"),
])
def test_dial_back_checks_that_a_libp2p_node_answers(reply, reachable, words):
    async def main():
        server = await _serve(reply)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await nat._libp2p_answers("127.0.0.1", port, timeout=5)

    answer = asyncio.run(main())
    assert answer["reachable"] is reachable and words in answer["detail"], answer


def test_dial_back_to_a_closed_port_is_unreachable():
    import socket

    with socket.socket() as s:  # a port that was free a moment ago and that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answer = asyncio.run(nat._libp2p_answers("127.0.0.1", port, timeout=5))
    assert answer["reachable"] is False and "could not dial" in answer["detail"]
