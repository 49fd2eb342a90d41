"""Ctrl+C in a terminal: the peer leaves cleanly instead of dying mid-round.

A terminal sends SIGINT to its whole foreground process group. For a peer that group holds
hivemind's DHT and averager processes and the ``p2pd`` daemon too: they die at once, the round
in flight is torn down and the peer can neither announce that it leaves nor finish its round.

So when ``join`` runs in a terminal it runs the peer as a child in a session of its own and
stays in front as a small supervisor: the first Ctrl+C (or SIGTERM, or a closed terminal)
becomes one SIGTERM to the peer's main process, which finishes or abandons its round within the
configured timeouts, announces that it leaves, saves and exits; a second Ctrl+C kills the
peer's whole process group at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

ENV = "P2PDILOCO_SUPERVISED"


def needed() -> bool:
    """True in an interactive terminal, unless this process is already the supervised peer."""
    return os.environ.get(ENV) != "1" and sys.stdin.isatty()


def run_supervised(argv: list[str]) -> int:
    """Run ``p2pdiloco ARGV`` as a child in its own session; returns its exit code."""
    child = subprocess.Popen(
        [sys.executable, "-m", "p2pdiloco", *argv], env=dict(os.environ, **{ENV: "1"}), start_new_session=True
    )
    presses = 0

    def forward(signum, _frame) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            # The peer says it is stopping in its own log: a line printed from here would cut
            # through the live view that the peer draws on the same terminal.
            child.send_signal(signal.SIGTERM)
        else:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # after the kill: the peer's live view can no longer redraw over this line
            print("\nquitting now: this epoch's work is lost", file=sys.stderr, flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    print(f"peer process {child.pid} (Ctrl+C: leave cleanly)", file=sys.stderr, flush=True)
    code = child.wait()  # resumed after each handled signal (PEP 475)
    if sys.stderr.isatty():  # a peer killed by the second Ctrl+C had no chance to show the cursor its live view hid
        sys.stderr.write("\x1b[?25h")
        sys.stderr.flush()
    return code if code >= 0 else 128 - code
