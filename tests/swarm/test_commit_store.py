"""The round commit's own confirmation (averaging.front._store_elsewhere) against real DHT nodes:
it counts only other nodes that took the record, whatever a refusing node answers last."""

import functools

import pytest
from hivemind.utils import get_dht_time

from p2pdiloco import auth
from p2pdiloco import dht as dht_node
from p2pdiloco.averaging.front import _store_elsewhere

pytestmark = pytest.mark.swarm


def store(node, key):
    return node.run_coroutine(functools.partial(_store_elsewhere, key, node.peer_id.to_base58(), get_dht_time() + 60))


def test_a_confirmation_counts_only_when_another_node_took_it_even_beside_a_node_that_refuses_it():
    secret, other = auth.RunSecret(b"m" * 32), auth.RunSecret(b"o" * 32)
    nodes = []
    try:
        alone = dht_node.start_dht([], secret=secret)
        nodes.append(alone)
        # Cut off (no other node): hivemind's own store would report success from its local copy.
        assert store(alone, "run.done.alone") is False
        member = dht_node.start_dht(dht_node.maddrs_of(alone), secret=secret)
        nodes.append(member)
        # An outsider's node (another secret) refuses every member record; it must not hide the others' yes.
        nodes += [dht_node.start_dht(dht_node.maddrs_of(alone), secret=other) for _ in range(2)]
        assert store(member, "run.done.round") is True
        found = alone.get("run.done.round", latest=True)
        assert found is not None and member.peer_id.to_base58() in found.value
    finally:
        for node in nodes:
            node.shutdown()
