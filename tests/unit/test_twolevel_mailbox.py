"""The two-level round's mailbox and repair answers (p2pdiloco/averaging/twolevel.py), without peers:
what a late message, a withdrawn cell and a served cell mean to the next request."""

import asyncio

from p2pdiloco.averaging.twolevel import Mailbox, _serve


def test_a_message_after_its_wait_ended_is_refused_and_never_taken():
    async def scenario():
        box = Mailbox()
        box.start("p")
        assert box.put("p", ("column", (0,), "a"), "early")  # before the wait: kept
        got = await box.take("p", [("column", (0,), "a"), ("column", (0,), "b")], silence_s=0.05)
        assert got == {("column", (0,), "a"): "early"}
        # b's column comes after the owner gave up on it: refused, so b does not count it delivered
        assert not box.put("p", ("column", (0,), "b"), "late")
        assert box.get("p", ("column", (0,), "b")) is None
        assert not box.put("p", ("column", (0,), "a"), "replay")  # the first message for a key counts
        assert box.get("p", ("column", (0,), "a")) == "early"

    asyncio.run(scenario())


def test_a_withdrawn_cell_is_not_here_and_a_served_one_is_marked():
    async def scenario():
        box = Mailbox()
        cell = (1, 0)
        assert _serve(box, "p", cell, None) is None and box.get("p", ("served", cell)) is None
        assert _serve(box, "p", cell, "bytes") == "bytes"
        assert box.get("p", ("served", cell))  # handed out: its decider keeps it
        other = (2, 0)
        box.put("p", ("withdrawn", other), True)
        assert _serve(box, "p", other, "bytes") is None  # withdrawn: "not here" to everyone from now on
        assert box.get("p", ("served", other)) is None

    asyncio.run(scenario())
