"""What ``p2pdiloco join`` shows while it trains: a live view in a terminal, log lines elsewhere.

In a terminal (``peer.console = "auto"`` with stderr a TTY, or ``"live"``) a small panel at the
bottom of the screen is redrawn a few times per second: epoch, inner step within the epoch's
budget, tokens/s, losses, the last group, the estimated time until the next round, bytes sent and
what the peer is doing. Log lines keep scrolling above it.

Elsewhere (a pipe or a file, as ``simulate``'s peers and the tests have) there are only log
lines: the peer's own, plus every ``peer.progress_every_s`` seconds one progress line with the
same facts (:func:`progress_line`).

Both run in a thread of their own and only *read* a snapshot of the peer (:class:`Facts`, from
the callable the view is given: :meth:`p2pdiloco.peer.Peer.facts`), so the training loop never
waits for the screen. What the peer does (:func:`state_of`) comes from what its main loop waits
on: nothing while it trains, its round (whose own stage says whether it still waits for peers or
already averages) or a state download.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from typing import IO, Callable

from rich.console import Console, Group, RenderableType
from rich.file_proxy import FileProxy
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

log = logging.getLogger("p2pdiloco")

REFRESH_PER_S = 4

_STATE_STYLES = {"training": "green", "waiting for peers": "yellow", "averaging": "cyan",
                 "downloading state": "magenta", "leaving": "red", "stopped": "red"}


@dataclasses.dataclass
class Facts:
    """One reading of a peer's progress: everything the view and the progress line show."""

    run: str
    peer: str  # the short id, as log lines name peers
    state: str  # training / waiting for peers / averaging / downloading state / leaving / stopped (see _state)
    epoch: int
    steps: int  # inner steps trained toward the next round...
    budget: int  # ...out of this many
    tokens_per_s: float
    train_loss: float | None
    val_loss: float | None
    val_epoch: int | None
    group_size: int | None  # peers in the last all-reduce group (None before the first round)
    live_peers: int  # other live peers this peer knows of
    eta_s: float | None  # seconds until the next round starts: 0 = now, None = not measured yet
    bytes_sent: int


def state_of(stopping: bool, activity: str | None, stage: str | None) -> str:
    """What the peer does now, from what its main loop waits on (``activity``: None while it
    trains, ``"round"``, ``"downloading state"``) and its pending round's ``stage`` (None: no round)."""
    if stopping:
        return "leaving"
    if activity == "downloading state" or stage is None:
        return activity or "training"
    # With overlap the loop trains on while a round waits for peers or all-reduces behind it.
    return stage if activity == "round" else f"training; round: {stage}"


def eta_of(steps: int, budget: int, steps_per_s: float, round_due: bool) -> float | None:
    """Seconds until the next round starts: 0 when the loop already waits for its round (the
    state says on what), None before the speed is measured."""
    if round_due:
        return 0.0
    if steps_per_s > 0:
        return max(0, budget - steps) / steps_per_s
    return None


# ------------------------------------------------------------------ formatting
def human_count(value: float) -> str:
    """1234.5 -> '1.2k', 3.4e6 -> '3.4M'."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.0f}"


def human_bytes(count: int) -> str:
    """Decimal units, as network speeds are quoted: 1_250_000 -> '1.2 MB'."""
    for limit, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if count >= limit:
            return f"{count / limit:.1f} {unit}"
    return f"{count} B"


def human_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _eta(facts: Facts) -> str:
    if facts.eta_s is None:
        return "-"
    if facts.eta_s == 0:
        return "now"
    return "in <1 s" if facts.eta_s < 1 else f"in ~{human_duration(facts.eta_s)}"


def _group(facts: Facts) -> str:
    return "-" if facts.group_size is None else str(facts.group_size)


def progress_line(facts: Facts) -> str:
    """The plain console's periodic line, in the style of the per-epoch log lines:
    ``progress | epoch 3 | step 2/4 | 1.2k tok/s | loss 3.214 | val 3.301 | group 2 | next round in ~3 s | sent 1.2 MB | training``
    (``-`` for what is not known yet)."""
    parts = [
        f"epoch {facts.epoch}",
        f"step {facts.steps}/{facts.budget}",
        f"{human_count(facts.tokens_per_s)} tok/s",
        f"loss {_loss(facts.train_loss)}",
        f"val {_loss(facts.val_loss)}",
        f"group {_group(facts)}",
        f"next round {_eta(facts)}",
        f"sent {human_bytes(facts.bytes_sent)}",
        facts.state,
    ]
    return "progress | " + " | ".join(parts)


def render(facts: Facts) -> RenderableType:
    """The live view: what the peer does on a line of its own, then label/value pairs in two columns."""
    state = Text.assemble(("● ", _STATE_STYLES.get(facts.state.split(";")[0], "green")), facts.state)
    grid = Table.grid(padding=(0, 2))
    for _ in range(4):
        grid.add_column()
    step = Table.grid(padding=(0, 1))
    step.add_row(Text(f"{facts.steps}/{facts.budget}"),
                 ProgressBar(total=max(facts.budget, 1), completed=min(facts.steps, facts.budget), width=16))
    val = _loss(facts.val_loss)
    if facts.val_loss is not None and facts.val_epoch is not None:
        val += f" (epoch {facts.val_epoch})"
    group = "-" if facts.group_size is None else f"{facts.group_size} peers"
    rows = [
        ("epoch", str(facts.epoch), "step", step),
        ("next round", _eta(facts), "tokens/s", human_count(facts.tokens_per_s)),
        ("train loss", _loss(facts.train_loss), "val loss", val),
        ("last group", f"{group} ({facts.live_peers} other{'' if facts.live_peers == 1 else 's'} live)",
         "sent", human_bytes(facts.bytes_sent)),
    ]
    for label, value, label2, value2 in rows:
        grid.add_row(*(Text(cell, "bold") if i % 2 == 0 else (Text(cell) if isinstance(cell, str) else cell)
                       for i, cell in enumerate((label, value, label2, value2))))
    return Panel(Group(state, grid), title=f"p2pdiloco · run '{facts.run}' · peer {facts.peer}", title_align="left",
                 subtitle="Ctrl+C: leave cleanly", subtitle_align="right", expand=False)


# ------------------------------------------------------------------ the view
def choose_mode(setting: str, stream: IO[str] | None = None) -> str:
    """``"live"`` or ``"plain"``: ``setting`` unless it is ``"auto"``, which means live when
    ``stream`` (default: stderr) is a terminal that can move its cursor."""
    if setting != "auto":
        return setting
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        tty = False
    return "live" if tty and os.environ.get("TERM") != "dumb" else "plain"


def _stderr_handlers(stream: IO[str]) -> list[logging.StreamHandler]:
    """Every logging handler writing to ``stream`` (ours, hivemind's, any library's)."""
    loggers = [logging.getLogger(), *(l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger))]
    return [h for l in loggers for h in l.handlers
            if type(h) is logging.StreamHandler and h.stream in (stream, sys.__stderr__)]


class View:
    """The console of one peer: :meth:`start` once the peer is built, :meth:`stop` on exit.

    ``stop`` is safe to call twice, or without ``start``.
    """

    def __init__(self, read: Callable[[], Facts], mode: str = "auto", progress_every_s: float = 30.0):
        self.read, self.mode, self.progress_every_s = read, choose_mode(mode), progress_every_s
        self.live: Live | None = None
        self.redirected: list[tuple[logging.StreamHandler, IO[str]]] = []
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.last: RenderableType = Text("")

    def start(self) -> None:
        if self.mode == "live":
            self._start_live()
        elif self.progress_every_s > 0:
            self.thread = threading.Thread(target=self._progress_lines, name="progress", daemon=True)
            self.thread.start()

    def _start_live(self) -> None:
        stderr = sys.stderr
        # force_terminal: "live" was asked for even where stderr does not look like a terminal.
        console = Console(stderr=True, force_terminal=True)
        self.live = Live(console=console, get_renderable=self._renderable, refresh_per_second=REFRESH_PER_S,
                         redirect_stdout=True, redirect_stderr=True)
        self.live.start()
        # Logging handlers hold the stderr they were created with, so Live's redirect of
        # sys.stderr does not reach them: point them at the live console, which prints each line
        # above the panel instead of through it.
        proxy = FileProxy(console, stderr)
        for handler in _stderr_handlers(stderr):
            self.redirected.append((handler, handler.setStream(proxy)))

    def _renderable(self) -> RenderableType:
        # Called from rich's refresh thread: an exception there would end the refreshes for good.
        try:
            facts = self.read()
            if self.stopped.is_set():  # the frame that stays on screen once the peer is gone
                facts.state = "stopped"
            self.last = render(facts)
        except Exception as e:
            log.debug("console view: %r", e)
        return self.last

    def _progress_lines(self) -> None:
        while not self.stopped.wait(self.progress_every_s):
            try:
                log.info("%s", progress_line(self.read()))
            except Exception as e:
                log.debug("progress line: %r", e)

    def stop(self) -> None:
        """Stop refreshing; the last panel stays on screen, the cursor is shown again and log
        lines go straight to stderr again."""
        self.stopped.set()
        if self.live is not None:
            live, self.live = self.live, None
            live.stop()
        for handler, stream in self.redirected:  # after the panel's last frame: lines printed meanwhile stay whole
            handler.setStream(stream)
        self.redirected = []

