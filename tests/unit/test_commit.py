"""The commit of a round (averaging.front._commit): the pure parts, the round's name and who is still
unconfirmed. The wait itself runs in every swarm test (each round commits)."""

from p2pdiloco.averaging.wire import commit_state, round_key, unconfirmed


def test_round_key_is_the_same_on_every_member_and_new_for_each_attempt():
    gathered = {"A": {"nonce": "01", "epoch": 3}, "B": {"nonce": "02", "epoch": 3}}
    same_seen_elsewhere = {"B": {"epoch": 3, "nonce": "02"}, "A": {"nonce": "01", "epoch": 3}}
    assert round_key(gathered) == round_key(same_seen_elsewhere)
    retry = {"A": {"nonce": "03", "epoch": 3}, "B": {"nonce": "04", "epoch": 3}}
    assert round_key(retry) != round_key(gathered)  # a stale confirmation never commits a retry
    assert round_key({"A": {"nonce": "01"}}) != round_key(gathered)  # another group
    assert round_key({"A": "garbage"})  # malformed metadata never crashes the commit


def test_every_member_must_confirm_except_those_left_out_for_garbage():
    members = ["A", "B", "C"]
    assert unconfirmed(members, done=["A"], excused=[]) == {"B", "C"}
    assert unconfirmed(members, done=["A", "B", "C"], excused=[]) == set()
    assert unconfirmed(members, done=["A", "B"], excused=["C"]) == set()  # C sent NaN: it never holds the result
    assert unconfirmed(members, done=["A", "B", "X"], excused=[]) == {"C"}  # a record of a non-member counts for nothing


def test_a_member_that_filed_failed_ends_the_wait_and_only_members_count():
    members = ["A", "B", "C"]
    assert commit_state(members, {"A": True, "B": True}, excused=[]) == ({"C"}, set())
    assert commit_state(members, {"A": True, "C": False}, excused=[]) == ({"B", "C"}, {"C"})  # C's round failed
    assert commit_state(members, {"A": True, "X": False}, excused=[]) == ({"B", "C"}, set())  # not a member: ignored
    assert commit_state(members, {"A": True, "B": True, "C": False}, excused=["C"]) == (set(), set())  # C was left out
    assert commit_state(members, {"A": True, "B": "yes", "C": None}, excused=[]) == ({"B", "C"}, set())  # other values: nothing
