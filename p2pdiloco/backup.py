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
from p2pdiloco.config import Recipe
from p2pdiloco.errors import StateDownloadFailed
from p2pdiloco.outer import OuterState, flatten_parameters

log = logging.getLogger("p2pdiloco")


class StateBackup:
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
        self.averager = PseudoGradientAverager(
            dht, self.outer.size, prefix=f"{self.run.name}_{self.fingerprint}", cfg=self.run.averaging,
            compression=self.run.compression, target_group_size=self.run.target_group_size,
            min_group_size=self.run.min_group_size, state_fn=self._serve, aggregation=self.run.aggregation,
            secret=auth.for_run(self.run.closed, secret),
        )
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="backup", daemon=True)
        self.thread.start()

    def _serve(self):
        with self.lock:
            return dict(self.outer.meta(), fingerprint=self.fingerprint), [t.clone() for t in self.outer.tensors()]

    def _loop(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                self._refresh()
                if self.held:
                    self._publish()
            except Exception as e:  # never take the coordinator down: try again next tick
                log.warning("backup: %r", e)

    def _refresh(self) -> None:
        records = swarm.read_progress(self.dht, self.run.name, timeout=self.peer_cfg.dht_request_s)
        live = {p: r for p, r in (records or {}).items() if not r.backup and p != self.peer_id}
        if not live:
            return
        epoch = max(r.epoch for r in live.values())
        if self.held and epoch < self.outer.epoch + self.every_epochs:
            return
        counts: dict[str, int] = {}
        for r in live.values():
            if r.epoch == epoch:
                counts[r.state_hash] = counts.get(r.state_hash, 0) + 1
        target = min(counts, key=lambda h: (-counts[h], h))  # the peers' own fork rule
        donors = sorted(p for p, r in live.items() if r.epoch == epoch and r.state_hash == target)
        try:
            donor, meta, tensors = self.averager.download_state(donors, timeout=self.peer_cfg.state_download_s)
            if not isinstance(meta, dict) or meta.get("fingerprint") != self.fingerprint or not isinstance(meta.get("epoch"), int):
                raise StateDownloadFailed(f"{donor} served a malformed state")
            with self.lock:  # load() checks values and digest first: a bad state leaves ours untouched
                self.outer.load(meta["epoch"], tensors, expected_hash=meta.get("state_hash"), pending=meta.get("pending", 0))
                self.held = True
        except StateDownloadFailed as e:
            log.warning("backup: %s", e)
            return
        self.averager.set_state_priority(self.outer.epoch)
        with self.lock:
            fields = self.outer.checkpoint_fields()
        # the run config makes the copy exportable (`p2pdiloco export`); the tokenizer then comes from the cache
        checkpoint.save(self.directory, dict(fingerprint=self.fingerprint, inner=None, data=None, config=self.run.canonical(), **fields))
        log.info("backup: state of epoch %d (from %s) saved to %s", self.outer.epoch, donor[-6:], self.directory)

    def _publish(self) -> None:
        with self.lock:
            epoch, digest = self.outer.epoch, self.outer.state_hash
        record = swarm.Progress(peer=self.peer_id, epoch=epoch, state_hash=digest, time=time.time(), backup=True)
        swarm.publish_progress(self.dht, self.run.name, record, ttl=3 * max(self.every_s, self.peer_cfg.heartbeat_s))

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=self.peer_cfg.state_download_s + self.peer_cfg.dht_request_s)
        self.averager.shutdown()
