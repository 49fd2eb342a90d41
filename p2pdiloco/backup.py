"""The coordinator's backup of a run's state: a donor that never trains.

Volunteers come and go; if every one of them leaves, the run's state would leave with them.
``p2pdiloco coordinator --backup CONFIG`` keeps a copy: every ``every_s`` seconds it looks at the
peers' records, and when the swarm is at least ``every_epochs`` epochs past its copy it downloads
the winning state (digest-checked, uncompressed), saves it atomically to ``DIR`` and publishes a
record marked ``backup``. Peers never wait for, group with or count a backup; a peer that finds
no live peer ahead of it but a backup ahead downloads the backup, so a swarm that all went away
restarts from the last copy instead of from scratch. A restarted coordinator reloads its copy.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from p2pdiloco import auth, checkpoint, swarm
from p2pdiloco.averaging import PseudoGradientAverager
from p2pdiloco.catchup import CatchUp
from p2pdiloco.config import Recipe
from p2pdiloco.outer import OuterState, flatten_parameters
from p2pdiloco.swarmview import SwarmView

log = logging.getLogger("p2pdiloco")


class StateBackup:
    """A coordinator's copy of a run's state: it follows the swarm with the peers' own rules
    (:class:`~p2pdiloco.swarmview.SwarmView`, the same fork rule) and fetches, checks and serves
    the state as they do (:class:`~p2pdiloco.catchup.CatchUp`)."""

    def __init__(self, dht, recipe: Recipe, directory: Path, every_epochs: int = 1, every_s: float = 10.0, secret=None):
        from p2pdiloco import model  # the parameter count; a 1B recipe needs ~4 GB of RAM here

        self.dht, self.run, self.peer_cfg = dht, recipe.run, recipe.peer
        self.directory, self.every_epochs, self.every_s = directory, every_epochs, every_s
        self.fingerprint = self.run.fingerprint()
        swarm.check_fingerprint(dht, self.run.name, self.fingerprint, self.run.canonical(), ttl=3600.0)
        self.peer_id = str(dht.peer_id)
        self.lock = threading.Lock()
        self.outer = OuterState.for_run(flatten_parameters(model.build_model(self.run.model)), self.run)
        self.held = False  # whether self.outer is a copy of the swarm's state (not just the init)
        saved = checkpoint.load(directory, fingerprint=self.fingerprint, size=self.outer.size)
        if saved is not None:
            self.outer.load_checkpoint(saved)
            self.held = True
            log.info("backup: reloaded the state of epoch %d from %s", self.outer.epoch, directory)
        self.view = SwarmView(self.peer_id)
        self.catchup = CatchUp(self.outer, fingerprint=self.fingerprint, lock=self.lock, ban=self._ban)
        self.averager = self.catchup.averager = PseudoGradientAverager.for_run(
            dht, self.run, self.outer.size, state_fn=self.catchup.serve, secret=auth.for_run(self.run.closed, secret),
            donor_only=True,
        )
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="backup", daemon=True)
        self.thread.start()

    def _ban(self, donor: str, reason: str) -> None:
        self.view.banned.add(donor)
        try:
            self.averager.ban(donor, reason)
        except Exception as e:  # the view's ban already keeps it out of our choices
            log.warning("backup: peer %s %s; could not tell the averager: %r", donor, reason, e)

    def _loop(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                self._refresh()
                if self.held:
                    self._publish()
            except Exception as e:  # never take the coordinator down: try again next tick
                log.warning("backup: %r", e)

    def _refresh(self) -> None:
        records = swarm.read_progress(self.dht, self.run.name, timeout=self.peer_cfg.dht_request_s, include_leaving=True)
        if records is None:
            return
        self.view.update(records)
        with self.lock:
            epoch, digest = self.outer.epoch, self.outer.state_hash
        if not self.held:
            epoch, digest = -1, ""  # the init is nobody's state: any live state is ahead of it
        # The peers' own rule, without a vote of ours (a backup never trained): a behind peer would
        # fetch the same state, and a fork of our epoch settled on another digest is fetched too.
        target = self.view.catch_up(epoch, digest, vote=False)
        if target is None or target.reason == "backup":
            return
        if target.reason == "behind" and self.held and target.epoch < epoch + self.every_epochs:
            return
        fetched = self.catchup.fetch(target.donors, target.epoch, timeout=self.peer_cfg.state_download_s)
        if fetched is None:
            log.warning("backup: no valid state of epoch %d from %d donor(s); trying again in %.0f s",
                        target.epoch, len(target.donors), self.every_s)
            return
        self.catchup.adopt(fetched)
        self.held = True
        with self.lock:
            fields = self.outer.checkpoint_fields()
        # the run config makes the copy exportable (`p2pdiloco export`); the tokenizer then comes from the cache
        checkpoint.save(self.directory, dict(fingerprint=self.fingerprint, inner=None, data=None, config=self.run.canonical(), **fields))
        log.info("backup: state of epoch %d (from %s) saved to %s", self.outer.epoch, fetched.donor[-6:], self.directory)

    def _publish(self) -> None:
        with self.lock:
            epoch, digest = self.outer.epoch, self.outer.state_hash
        record = swarm.Progress(peer=self.peer_id, epoch=epoch, state_hash=digest, time=time.time(), backup=True)
        swarm.publish_progress(self.dht, self.run.name, record, ttl=3 * max(self.every_s, self.peer_cfg.heartbeat_s))

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=self.peer_cfg.state_download_s + self.peer_cfg.dht_request_s)
        self.averager.shutdown()
