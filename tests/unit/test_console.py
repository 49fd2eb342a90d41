"""The console of ``join``: the live view's text, the plain progress line, which one is chosen."""

from __future__ import annotations

import io
import logging
import threading
import time
from types import SimpleNamespace

import pytest
from rich.console import Console

from p2pdiloco import console
from p2pdiloco.peer import Peer
from p2pdiloco.swarm import RoundStat


def fake_peer(**overrides) -> SimpleNamespace:
    """The Peer attributes its console snapshot (:meth:`Peer.facts`) reads, at epoch 7 in the
    middle of its inner steps."""
    peer = SimpleNamespace(
        run_cfg=SimpleNamespace(name="test"),
        short_id="abc123",
        stop_requested=threading.Event(),
        activity=None,
        round=None,
        outer=SimpleNamespace(epoch=7),
        work=SimpleNamespace(steps=3),
        attempt_from=0,
        budget=10,
        speedometer=SimpleNamespace(steps_per_s=2.0),
        tokens_per_s=12_345.0,
        last_loss=3.21456,
        last_val=3.5,
        last_val_epoch=6,
        recent_rounds=[RoundStat(epoch=7, group_size=3, allreduce_s=0.4, bytes_sent=1000)],
        bytes_sent_total=2_500_000,
        view=SimpleNamespace(live={"p1": None, "p2": None, "p3": None}),
    )
    for key, value in overrides.items():
        setattr(peer, key, value)
    return peer


def read_facts(peer: SimpleNamespace) -> console.Facts:
    return Peer.facts(peer)


def rendered(facts: console.Facts, width: int = 100) -> str:
    out = Console(record=True, width=width, file=io.StringIO())
    out.print(console.render(facts))
    return out.export_text()


def test_read_facts_of_a_training_peer():
    facts = read_facts(fake_peer())
    assert facts == console.Facts(
        run="test", peer="abc123", state="training", epoch=7, steps=3, budget=10, tokens_per_s=12_345.0,
        train_loss=3.21456, val_loss=3.5, val_epoch=6, group_size=3, live_peers=3, eta_s=3.5, bytes_sent=2_500_000,
    )


def test_live_view_text():
    text = rendered(read_facts(fake_peer()))
    assert "run 'test'" in text and "peer abc123" in text
    for expected in ("● training", "epoch", "7", "3/10", "next round", "in ~4 s", "12.3k", "train loss", "3.215",
                     "val loss", "3.500 (epoch 6)", "3 peers (3 others live)", "2.5 MB", "Ctrl+C"):
        assert expected in text, expected


def test_live_view_before_anything_is_measured():
    peer = fake_peer(speedometer=SimpleNamespace(steps_per_s=0.0), tokens_per_s=0.0, last_loss=None, last_val=None,
                     last_val_epoch=None, recent_rounds=[], bytes_sent_total=0, view=SimpleNamespace(live={}), work=SimpleNamespace(steps=0))
    facts = read_facts(peer)
    assert (facts.eta_s, facts.group_size, facts.train_loss) == (None, None, None)
    text = rendered(facts, width=80)
    assert "0/10" in text and "0 B" in text and "(0 others live)" in text
    assert "(1 other live)" in rendered(read_facts(fake_peer(view=SimpleNamespace(live={"p1": None}))))
    assert console.progress_line(facts) == (
        "progress | epoch 7 | step 0/10 | 0 tok/s | loss - | val - | group - | next round - | sent 0 B | training"
    )


@pytest.mark.parametrize(
    "activity, stage, stopping, expected",
    [
        (None, None, False, "training"),
        ("round", "waiting for peers", False, "waiting for peers"),
        ("round", "averaging", False, "averaging"),
        (None, "waiting for peers", False, "training; round: waiting for peers"),  # overlap: trains meanwhile
        (None, "averaging", False, "training; round: averaging"),
        ("downloading state", None, False, "downloading state"),
        ("round", "averaging", True, "leaving"),
    ],
)
def test_state(activity, stage, stopping, expected):
    pending = None if stage is None else SimpleNamespace(stage=stage)
    peer = fake_peer(activity=activity, round=pending)
    if stopping:
        peer.stop_requested.set()
    facts = read_facts(peer)
    assert facts.state == expected
    assert expected in rendered(facts)
    if activity == "round" and not stopping:
        assert facts.eta_s == 0 and "next round now" in console.progress_line(facts)


def test_steps_count_from_the_last_attempt():
    # A round that found nobody: its steps stay in the work, the next attempt waits for a budget more.
    facts = read_facts(fake_peer(work=SimpleNamespace(steps=14), attempt_from=10))
    assert (facts.steps, facts.eta_s) == (4, 3.0)


def test_progress_line_format():
    line = console.progress_line(read_facts(fake_peer()))
    assert line == ("progress | epoch 7 | step 3/10 | 12.3k tok/s | loss 3.215 | val 3.500 | group 3 | "
                    "next round in ~4 s | sent 2.5 MB | training")


def test_human_units():
    assert [console.human_bytes(n) for n in (999, 1500, 2_500_000, 3_200_000_000)] == ["999 B", "1.5 kB", "2.5 MB", "3.2 GB"]
    assert [console.human_count(n) for n in (12, 1234, 5_600_000)] == ["12", "1.2k", "5.6M"]
    assert [console.human_duration(s) for s in (3, 120, 7200)] == ["3 s", "2 min", "2.0 h"]


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_mode_choice(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    assert console.choose_mode("auto", _Stream(tty=True)) == "live"
    assert console.choose_mode("auto", _Stream(tty=False)) == "plain"
    assert console.choose_mode("plain", _Stream(tty=True)) == "plain"
    assert console.choose_mode("live", _Stream(tty=False)) == "live"
    monkeypatch.setenv("TERM", "dumb")  # a terminal that cannot move its cursor
    assert console.choose_mode("auto", _Stream(tty=True)) == "plain"


def test_plain_view_logs_progress_lines(caplog):
    view = console.View(lambda: read_facts(fake_peer()), "plain", progress_every_s=0.05)
    with caplog.at_level(logging.INFO, logger="p2pdiloco"):
        view.start()
        time.sleep(0.3)
        view.stop()
        count = len(caplog.records)
        time.sleep(0.15)
    assert count >= 2 and len(caplog.records) == count  # none after stop
    assert caplog.records[0].getMessage().startswith("progress | epoch 7 | step 3/10")


def test_plain_view_with_progress_off():
    view = console.View(lambda: read_facts(fake_peer()), "plain", progress_every_s=0)
    view.start()
    assert view.thread is None
    view.stop()


def test_live_view_keeps_log_lines_whole(monkeypatch):
    """Live mode on a (fake) terminal: log lines print above the panel, handlers are restored."""
    screen = _Stream(tty=True)
    monkeypatch.setattr("sys.stderr", screen)
    handler = logging.StreamHandler(screen)
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    logger = logging.getLogger("p2pdiloco.test_console")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        view = console.View(lambda: read_facts(fake_peer()), "live")
        view.start()
        time.sleep(0.6)  # a couple of refreshes
        logger.warning("epoch   7 | outer_step | loss 3.215")
        time.sleep(0.3)
        view.stop()
        view.stop()
    finally:
        logger.removeHandler(handler)
    assert handler.stream is screen  # back to the real stderr
    output = screen.getvalue()
    assert "LOG epoch   7 | outer_step | loss 3.215" in output
    assert "peer abc123" in output and "\x1b[?25h" in output  # the panel was drawn, the cursor shown again
