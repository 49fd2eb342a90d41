"""The fork rule every peer applies to the same records: judged only once it is settled."""

from p2pdiloco.swarm import fork_settled


def test_a_complete_view_settles_even_a_tie_on_the_smaller_digest():
    assert fork_settled({"a": 2, "b": 2}, "a", pending=0)
    assert fork_settled({"a": 3, "b": 1}, "a", pending=0)
    assert fork_settled({"a": 1}, "a", pending=0)


def test_peers_still_behind_could_turn_the_outcome():
    # The partial views of the failure this rule fixes: each pair saw the other complete and its
    # own partner not yet published, and each pair's peers downloaded the other branch.
    assert not fork_settled({"a": 1, "b": 2}, "b", pending=1)  # a + 1 would tie b and win it
    assert fork_settled({"a": 2, "b": 1}, "a", pending=1)  # the other view: b + 1 ties, a keeps it
    assert not fork_settled({"a": 2, "b": 2}, "a", pending=1)
    # One newcomer far behind cannot outvote three peers, nor a digest it might bring.
    assert fork_settled({"a": 3}, "a", pending=1)
    assert fork_settled({"a": 3, "b": 1}, "a", pending=1)
    # A lone peer with one behind: an unseen digest could tie it and be smaller.
    assert not fork_settled({"a": 1}, "a", pending=1)


def test_the_smaller_digest_keeps_a_tie_the_laggards_can_at_most_force():
    assert fork_settled({"a": 3, "b": 2}, "a", pending=1)  # b + 1 ties a, and a wins ties
    assert not fork_settled({"b": 3, "a": 2}, "b", pending=1)  # a + 1 would tie b and win it
