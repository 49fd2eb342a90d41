"""A peer of a p2pdiloco run: the wiring of its parts and the DiLoCo loop over the swarm.

Each epoch (see :meth:`Peer.run`, the whole algorithm on one screen):

1. **train**: inner AdamW steps from the global parameters theta_e: ``inner_steps`` (H), or with
   dynamic local updates H x (our speed / the fastest peer's), so peers of unequal speed finish
   together;
2. **measure**: the pseudo-gradient delta = theta_e - theta_local;
3. **average**: delta with the same-epoch peers (consistent all-reduce, weighted by tokens), in
   the background while the next epoch's inner steps already run (overlap; :mod:`p2pdiloco.rounds`);
4. **outer step** (Nesterov, delayed Nesterov, SGD or SlowMo) -> theta_{e+1}, identical on every
   member; **adopt** it, keeping the steps trained while the round ran (rebase);
5. **record**: the epoch's metrics, and this peer's progress record in the DHT.

A failed round is never applied: its work stays and goes with the next attempt. A peer that is
behind or on a losing fork downloads the swarm's state and rebases its work onto it. A peer applies
an outer step on its own delta only when it is alone in the run.

The parts: :class:`~p2pdiloco.swarmview.SwarmView` (what this peer knows of the others and the
decisions taken from it), :class:`~p2pdiloco.presence.Presence` (its record and heartbeat),
:class:`~p2pdiloco.rounds.Round` (a round in the background), :class:`~p2pdiloco.catchup.CatchUp`
(fetching, checking, adopting and serving a whole state), the averager
(:mod:`p2pdiloco.averaging`) and the outer state (:mod:`p2pdiloco.outer`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from p2pdiloco import auth, checkpoint, console, dht, metrics, nat, pace, supervise, swarm
from p2pdiloco.averaging import PseudoGradientAverager, RoundResult
from p2pdiloco.catchup import CatchUp
from p2pdiloco.config import Recipe
from p2pdiloco.errors import CheckpointError, StateDownloadFailed
from p2pdiloco.local import make as make_local
from p2pdiloco.outer import OuterState
from p2pdiloco.presence import Presence
from p2pdiloco.rounds import PendingRound, Round, judge_flags
from p2pdiloco.swarmview import SwarmView, Target

log = logging.getLogger("p2pdiloco")

CONFIG_TTL_S = 3600.0  # the run config record's lifetime; every peer refreshes it each epoch


class Peer:
    """One volunteer: DHT + averager + model + data, driven by :meth:`run`."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        initial_peers: list[str],
        max_epochs: int | None = None,
        metrics_file: str | None = None,
        export_dir: str | None = None,
        stop_requested: threading.Event | None = None,
        secret_file: str | None = None,
    ):
        from p2pdiloco import corpus

        initial_peers = dht.validate_multiaddrs(initial_peers)
        self.run_cfg, self.peer_cfg = run, peer = recipe.run, recipe.peer
        self.max_epochs, self.export_dir = max_epochs, export_dir
        if export_dir:  # refused now rather than after the whole run has trained
            from p2pdiloco.export import check_outdir

            check_outdir(Path(export_dir), force=True)
        metrics.require_packages(peer)  # a switched-on TensorBoard or wandb that is missing fails now, not later
        self.secret = auth.for_run(run.closed, auth.load_secret(secret_file))  # the file, else $P2PDILOCO_RUN_SECRET
        self.fingerprint = run.fingerprint()
        self.stop_requested = stop_requested or threading.Event()
        self.state_lock = threading.Lock()  # the outer step vs. newcomers downloading the state
        if peer.threads:
            torch.set_num_threads(peer.threads)

        cache = Path(peer.cache_dir).expanduser()
        prepared = corpus.prepare(run.data, run.model.vocab_size, cache)  # before the DHT: a slow first run must not time out peers
        self.tokenizer_files = checkpoint.tokenizer_files(prepared / corpus.TOKENIZER_DIR)  # saved in checkpoints, for export
        network = nat.resolve(peer.nat, host=peer.host, port=peer.port, public_host=peer.public_host,
                              initial_peers=initial_peers, timeout=peer.nat_probe_s)
        log.info("network mode: %s (%s)", network.mode, network.reason)
        self.dht = dht.start_dht(
            initial_peers,
            host=peer.host,
            port=network.port,
            public_host=network.public_host,
            identity=peer.identity,
            timeout=peer.bootstrap_s,
            nat=network.mode,
            secret=self.secret,
        )
        self.client_mode = network.mode == "client"  # reduces no slice and serves no state (see p2pdiloco.nat)
        self.peer_id = str(self.dht.peer_id)
        self.resumed_epoch: int | None = None
        try:
            self._build(run, peer, cache)
            self.sinks = metrics.open_sinks(peer, metrics_file, run_name=run.name, peer_id=self.peer_id,
                                            config=dict(run.canonical(), fingerprint=self.fingerprint))
        except BaseException:
            dht.stop_dht(self.dht)  # a refused or failed start leaves no DHT process or p2pd behind
            raise
        self.watchdog = dht.RoutingWatchdog(self.dht, initial_peers, peer.rebootstrap_s, peer.dht_request_s)
        self.banned: set[str] = set()  # peers caught sending non-finite values or invalid states
        self.flag_streak: dict[str, int] = {}  # consecutive rounds a robust rule flagged each peer
        self.view = SwarmView(self.peer_id, self.banned)
        self.presence = Presence(self.dht, run.name, self.view, peer, self._progress_record)
        self.tokens_per_s = 0.0
        self.last_loss: float | None = None
        self.last_val: float | None = None
        self.last_val_epoch: int | None = None
        self.last_round: tuple[int, list[str], float] | None = None  # (epoch reached, group, when)
        self.recent_rounds: list[swarm.RoundStat] = []  # published in our record, for dashboards
        self.bytes_sent_total = 0
        self.speedometer = pace.Speedometer(peer.emulate_speed, recipe.run.inner_steps, self.stop_requested)
        self.work = pace.Work(started_epoch=self.outer.epoch)  # trained and not yet averaged
        self.attempt_from = 0  # work.steps when the last round was started: the next waits for a budget more
        self.budget = recipe.run.inner_steps
        self.round: PendingRound | None = None
        self.rounds = Round(run=run, peer_id=self.peer_id, state=lambda: (self.outer.epoch, self.outer.state_hash),
                            averager=self.averager, presence=self.presence, stop=self.stop_requested,
                            run_over=self._run_over, learn_bans=self._learn_bans, client=self.client_mode)
        self.round_runner = ThreadPoolExecutor(1, thread_name_prefix="round")  # one round at a time
        self.clock = dict(since=time.monotonic(), compute=0.0, eval=0.0)
        self.activity: str | None = None  # what the loop waits on (console view): None = training, "round", "downloading state"
        self.console = console.View(self.facts, peer.console, peer.progress_every_s)  # live in a terminal, else log lines

    def _build(self, run, peer, cache: Path) -> None:
        joined = swarm.check_fingerprint(self.dht, run.name, self.fingerprint, run.canonical(), ttl=CONFIG_TTL_S)
        log.info("peer %s %s run '%s' (config %s)", self.short_id, "joined" if joined else "started", run.name, self.fingerprint)
        self.local = make_local(run, peer, cache, shard_key=self.peer_id)  # one device, or workers on several
        self.outer = OuterState.for_run(self.local.parameters(), run)
        self.catchup = CatchUp(self.outer, fingerprint=self.fingerprint, lock=self.state_lock, ban=self._ban)
        self.averager = self.catchup.averager = PseudoGradientAverager.for_run(
            self.dht, run, self.outer.size, state_fn=self.catchup.serve, client_mode=self.client_mode, secret=self.secret,
        )
        # Error feedback: what quantization dropped from our last contribution, sent with the next;
        # in two-level rounds also the spans of it that no decision included (carried over).
        self.residual = torch.zeros(self.outer.size) if run.error_feedback or run.averaging.protocol == "two_level" else None
        if peer.checkpoint_dir:
            self._resume(peer.checkpoint_dir)

    def _resume(self, directory: str) -> None:
        """Continue from this peer's own checkpoint, if it has one (the swarm is still asked first)."""
        state = checkpoint.load(directory, fingerprint=self.fingerprint, size=self.outer.size)
        if state is None:
            return
        try:
            self.outer.load_checkpoint(state)
        except StateDownloadFailed as e:
            raise CheckpointError(f"checkpoint in {directory} fails its check ({e}): move it away to start fresh") from None
        residual = state.get("residual")
        if self.residual is not None and isinstance(residual, torch.Tensor) and residual.shape == self.residual.shape:
            self.residual.copy_(residual)
        if not self.local.load_state_dict(state):  # another peer id (no --identity) reads another shard
            log.info("data position not restored: this peer id reads another shard (use --identity to keep it)")
        self.local.load(self.outer.params)
        self.resumed_epoch = self.outer.epoch
        log.info("resumed from %s at epoch %d", checkpoint.checkpoint_path(directory), self.outer.epoch)

    def save_checkpoint(self, level: int = logging.DEBUG) -> None:
        """Write the global state, inner optimizer and data position (atomically), with the run
        config and tokenizer that ``p2pdiloco export`` needs to rebuild the model."""
        with self.state_lock:
            state = dict(fingerprint=self.fingerprint, **self.outer.checkpoint_fields())
        state.update(**self.local.state_dict(), config=self.run_cfg.canonical(), tokenizer=self.tokenizer_files)
        if self.residual is not None:
            state["residual"] = self.residual.clone()
        path = checkpoint.save(self.peer_cfg.checkpoint_dir, state)
        log.log(level, "checkpoint of epoch %d saved to %s", state["epoch"], path)

    @property
    def short_id(self) -> str:
        return self.peer_id[-6:]

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        self.console.start()
        self.presence.start()
        if self.resumed_epoch is not None:
            self._record(dict(epoch=self.outer.epoch, event="resumed"))
        self._sync_with_swarm()  # a resumed peer downloads the newer state if the swarm moved on
        if self.outer.epoch == 0:
            self._record(dict(epoch=0, event="start", val_loss=self._maybe_eval(force=True)))
        self.budget = self._epoch_budget()
        while True:
            pending, budget_spent = self.round, self.work.steps - self.attempt_from >= self.budget
            if pending and budget_spent and self.run_cfg.overlap and self._resend(pending):
                continue  # nobody else is ready yet: the waiting round will send our latest work instead
            if pending and (pending.future.done() or not self.run_cfg.overlap or self.stop_requested.is_set() or budget_spent):
                self._finish_round()  # apply the average and rebase the work done meanwhile, or keep the work
            elif self._done():
                return
            elif budget_spent and not pending:
                self._start_round()  # delta = theta_e - local, averaged in the background
            else:
                self._train_step()  # one inner AdamW step (also while a round runs or waits for peers: overlap)

    def _train_step(self) -> None:
        step = self.outer.epoch * self.run_cfg.inner_steps + self.work.steps  # the run's global schedule
        loss, seconds = self.speedometer.timed(lambda: self.local.step(step))
        self.work.add(loss, self.local.tokens_per_step, seconds)
        self.clock["compute"] += seconds
        self.tokens_per_s = self.speedometer.steps_per_s * self.local.tokens_per_step
        self.last_loss = loss
        self.budget = self._epoch_budget()  # speeds change (ours, or a faster peer joined)

    def _epoch_budget(self) -> int:
        """Inner steps before this peer's next round: H, or H scaled by our speed (DyLU)."""
        run = self.run_cfg
        if not run.dynamic_local_updates:
            return run.inner_steps
        speeds = [r.speed for r in self.view.live.values()]
        budget = pace.dylu_steps(run.inner_steps, self.speedometer.steps_per_s, speeds, run.min_inner_steps)
        self.speedometer.window = max(budget, 5)  # our speed as measured over about one epoch
        return budget

    def _measure(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(pseudo-gradient to send, the local parameters it was measured to)."""
        local = self.local.parameters()
        delta = self.outer.pseudo_gradient(local)
        if self.residual is not None:
            delta += self.residual  # error feedback: what the codec dropped last time goes now
        return delta, local

    def _start_round(self) -> None:
        delta, local = self._measure()
        if not torch.isfinite(delta).all():
            log.error("pseudo-gradient has NaN/Inf: discarding this epoch's work and re-syncing")
            self.local.load(self.outer.params)
            self.work, self.attempt_from = pace.Work(started_epoch=self.outer.epoch), 0
            return
        self.attempt_from = self.work.steps
        self.round = PendingRound(delta, local, self.work.snapshot())
        self.round.future = self.round_runner.submit(self.rounds, self.round)

    def _resend(self, pending: PendingRound) -> bool:
        """While no other peer is ready, replace what the waiting round will send by our latest
        work: the steps trained while waiting then travel now instead of being rebased onto a
        newer state (at most one budget of steps is ever rebased). False once the round has
        started (or if the work is not finite): the caller then waits for it."""
        if not pending.waiting_alone or pending.future.done():
            return False
        delta, local = self._measure()
        if not torch.isfinite(delta).all() or not pending.refresh(delta, local, self.work.snapshot()):
            return False
        self.attempt_from = self.work.steps
        return True

    def _finish_round(self) -> None:
        """Wait for the pending round (idle only if training could not hide it) and act on it."""
        pending, self.activity = self.round, "round"
        result = pending.future.result()  # bounded: waiting for peers (grace_s or round_s), the round (round_s), DHT requests
        self.round, self.activity = None, None
        if isinstance(result, RoundResult) or result == "alone":
            self._outer_step(result, pending)
            self._sync_with_swarm()  # another group at our epoch may have won (a fork): adopt its state
        elif result == "behind":  # the swarm moved on: fetch its state and bring our work onto it
            epoch = self.outer.epoch
            self._sync_with_swarm()
            if self.outer.epoch > epoch:
                self.attempt_from = 0  # our work, rebased, is ready for the swarm's next round
        else:  # no round: keep the work; it goes, with what is added to it, at the next attempt
            self.presence.publish(ready=False)
        self.budget = self._epoch_budget()

    def _outer_step(self, result, pending: PendingRound) -> None:
        """Apply the round's average (or, alone in the run, our own pseudo-gradient) to the global
        state, adopt it keeping the steps trained meanwhile, and record the epoch."""
        group = result if isinstance(result, RoundResult) else None
        averaged = self._take_average(group, pending)
        applied_to = self.outer.epoch
        with self.state_lock:
            self.outer.step(averaged, contributions=len(group.group) if group else 1)
            digest = self.outer.state_hash
        self.averager.set_state_priority(self.outer.epoch)
        self.local.rebase(pending.base, self.outer.params)  # adopt, keeping the steps trained while the round ran
        done, self.work, self.attempt_from = pending.sent, self.work.since(pending.sent, self.outer.epoch), 0
        if group:
            self._note_round(group)
        self.last_loss = sum(done.losses) / len(done.losses)
        self._record(self._epoch_fields(group, done, digest, staleness=applied_to - done.started_epoch))
        if self.peer_cfg.checkpoint_dir and self.outer.epoch % self.peer_cfg.checkpoint_every == 0:
            self.save_checkpoint()

    def _take_average(self, group: RoundResult | None, pending: PendingRound) -> torch.Tensor:
        """The pseudo-gradient the outer step applies; error feedback keeps what the codec dropped."""
        if group is not None:
            if self.residual is not None:
                if group.residual is not None:
                    self.residual.copy_(group.residual)
                else:
                    self.residual.zero_()
                for start, stop in pending.carried:  # two-level: work no decision included goes next time
                    self.residual[start:stop] = pending.delta[start:stop]
            return group.average
        log.info("no other peer in the run: applying this peer's own pseudo-gradient")
        if self.residual is not None:
            self.residual.zero_()  # applied in full, nothing dropped
        return pending.delta  # alone in the run: our delta is the swarm's average

    def _note_round(self, group: RoundResult) -> None:
        """Bans from the round's flags and refusals, and the round's figures for our DHT record and the console."""
        self._judge_flags(group)
        for peer in group.refused:  # non-finite or malformed values: not an honest outlier, no streak needed
            if peer not in self.banned and peer != self.peer_id:
                self._ban(peer, "sent non-finite or malformed values (named in the round's decisions)")
        self.last_round = (self.outer.epoch, group.group, time.monotonic())
        self.bytes_sent_total += group.bytes_sent
        stat = swarm.RoundStat(epoch=self.outer.epoch, group_size=len(group.group), contributors=len(group.contributors),
                               allreduce_s=group.seconds, bytes_sent=group.bytes_sent)
        self.recent_rounds = [*self.recent_rounds, stat][-swarm.RECENT_ROUNDS:]

    def _epoch_fields(self, group: RoundResult | None, done: pace.Work, digest: str, staleness: int) -> dict:
        """The metrics record of an outer step (README, "Machine-readable output")."""
        val_loss = self._maybe_eval()
        return dict(
            epoch=self.outer.epoch,
            event="outer_step" if group else "solo_step",
            state_hash=digest,
            group_size=len(group.group) if group else 1,
            group=group.group if group else [self.peer_id],
            # whose pseudo-gradients this state holds: the group less the members left out of the average
            contributors=sorted(group.contributors) if group else [self.peer_id],
            # two-level: peers only part of whose work is in it (an owner died), with that share
            partly_included={p: round(x, 4) for p, x in sorted(group.included.items()) if 0 < x < 1} if group else {},
            inner_steps=done.steps,
            tokens=done.tokens,
            staleness=staleness,  # outer steps between the work's base and its round
            overlap_steps=self.work.steps,  # trained while the round ran, carried into the next epoch
            speed=self.speedometer.steps_per_s,
            train_loss=self.last_loss,
            allreduce_s=group.seconds if group else 0.0,
            bytes_sent=group.bytes_sent if group else 0,
            bytes_received=group.bytes_received if group else 0,
            encode_s=group.encode_s if group else 0.0,
            decode_s=group.decode_s if group else 0.0,
            flagged=group.flagged if group else [],
            banned=sorted(self.banned),
            one_sided=self.averager.one_sided,  # this process's rounds that may have ended one-sided (README, "one_sided")
            val_loss=val_loss,
            **self._clock_fields(),
        )

    def _judge_flags(self, result: RoundResult) -> None:
        """Ban, for the run, a member the reducers' robust rule flagged in ``ban_after``
        consecutive rounds with us (:func:`p2pdiloco.rounds.judge_flags`)."""
        for peer in judge_flags(self.flag_streak, result.group, result.flagged, self.run_cfg.aggregation.ban_after):
            if peer not in self.banned:
                self._ban(peer, f"was flagged by the robust aggregation in {self.flag_streak[peer]} consecutive rounds")
        if result.flagged:
            log.info("robust aggregation flagged %s in this round", ", ".join(p[-6:] for p in result.flagged))

    def _ban(self, peer: str, reason: str) -> None:
        """Ignore ``peer`` for the rest of the run: in our decisions (the view) and our groups (the averager)."""
        self.banned.add(peer)
        try:
            self.averager.ban(peer, reason)
        except Exception as e:  # the host-side ban still keeps it out of our readiness counts
            log.warning("peer %s %s; could not tell the averager: %r", peer, reason, e)

    def _learn_bans(self) -> None:
        """Ignore, from now on, the peers our averager caught sending non-finite values."""
        try:
            self.banned.update(self.averager.banned())
        except Exception as e:  # the averager did not answer in time: learn them after the next round
            log.debug("could not list banned peers: %r", e)

    def _clock_fields(self) -> dict:
        """Where this peer's time went since the last record: ``compute_s`` (inner steps, emulated
        slowness included), ``eval_s`` (evaluating the global model, a measurement: left out of the
        utilization), ``idle_s`` (everything else: waiting for a round, outer step, downloads)."""
        now, clock = time.monotonic(), self.clock
        self.clock = dict(since=now, compute=0.0, eval=0.0)
        busy = max(now - clock["since"] - clock["eval"], 1e-9)
        return dict(compute_s=clock["compute"], wall_s=now - clock["since"], eval_s=clock["eval"],
                    idle_s=max(0.0, busy - clock["compute"]), compute_utilization=min(1.0, clock["compute"] / busy))

    # ---------------------------------------------------------------- catching up
    def _sync_with_swarm(self) -> None:
        """Download the swarm's state if it is ahead of ours or if ours is a minority fork (or, alone,
        a coordinator's backup that is ahead: the run went on before us).

        Each of ``state_download_attempts`` reads the records afresh and picks the target again: the
        donors of the last try may have moved on, or (client-mode peers) may not serve at all, while
        a peer that just reached the same state can; a donor banned for an invalid state is no
        longer in the view."""
        for _ in range(self.peer_cfg.state_download_attempts):
            if self.presence.live_others() is None:
                return  # the DHT is unreadable right now, or we may be cut off: try again next epoch
            target = self.view.catch_up(self.outer.epoch, self.outer.state_hash)
            if target is None:
                return
            if target.reason == "backup":
                log.info("epoch %d, no live peer, a backup at %d: downloading it", self.outer.epoch, target.epoch)
            else:
                log.info("epoch %d, swarm at %d (%s): downloading the state from %d peer(s)", self.outer.epoch,
                         target.epoch, target.reason, len(target.donors))
            if self._download_state(target):
                return
        log.warning("could not download the swarm's state; continuing and retrying next epoch")

    def _download_state(self, target: Target) -> bool:
        """Catch up from one of the target's donors, keeping our unsent work (rebased); the console
        shows it. False if none of them served a valid state within ``state_download_s``."""
        self.activity = "downloading state"
        try:
            fetched = self.catchup.fetch(target.donors, target.epoch, timeout=self.peer_cfg.state_download_s)
            if fetched is None:
                return False
            previous = self.outer.params.clone()  # the base our unsent work was trained from
            self.catchup.adopt(fetched)
            self.local.rebase(previous, self.outer.params)  # our work so far goes, stale, into our next round
            self._record(dict(epoch=self.outer.epoch, event="downloaded", reason=target.reason,
                              state_hash=fetched.header.state_hash, donor=fetched.donor, val_loss=self._maybe_eval(),
                              rebased_steps=self.work.steps))  # unsent work kept: it goes in our next round
            log.info("now at epoch %d (state from %s)", self.outer.epoch, fetched.donor[-6:])
            return True
        finally:
            self.activity = None

    # ---------------------------------------------------------------- bookkeeping
    def _done(self) -> bool:
        return self.stop_requested.is_set() or self._run_over()

    def _run_over(self) -> bool:
        return self.view.run_over(self.outer.epoch, self.max_epochs)

    def _progress_record(self, ready: bool, leaving: bool) -> swarm.Progress:
        """This peer's record for the DHT (see :class:`p2pdiloco.presence.Presence`)."""
        with self.state_lock:  # epoch and digest of the same state
            epoch, digest = self.outer.epoch, self.outer.state_hash
        return swarm.Progress(
            peer=self.peer_id,
            epoch=epoch,
            state_hash=digest,
            tokens_per_s=self.tokens_per_s,
            speed=self.speedometer.steps_per_s,
            train_loss=self.last_loss,
            val_loss=self.last_val,
            val_epoch=self.last_val_epoch,
            shard=self.local.stream.shard,
            time=time.time(),
            ready=ready,
            leaving=leaving,
            rounds=self.recent_rounds,
            bytes_sent_total=self.bytes_sent_total,
            one_sided=self.averager.one_sided,
            client=self.client_mode,
            devices=[str(d) for d in self.local.devices],
        )

    def facts(self) -> console.Facts:
        """What the console shows, read without locking: each attribute is one read of a simple
        type written by the loop or the round's thread, so the worst is a moment out of date."""
        pending, steps, speed = self.round, self.work.steps - self.attempt_from, self.speedometer.steps_per_s
        due = pending is not None and self.activity == "round"
        last_round = self.recent_rounds[-1] if self.recent_rounds else None
        return console.Facts(
            run=self.run_cfg.name,
            peer=self.short_id,
            state=console.state_of(self.stop_requested.is_set(), self.activity, pending and pending.stage),
            epoch=self.outer.epoch,
            steps=steps,
            budget=self.budget,
            tokens_per_s=self.tokens_per_s,
            train_loss=self.last_loss,
            val_loss=self.last_val,
            val_epoch=self.last_val_epoch,
            group_size=last_round.group_size if last_round else None,
            live_peers=len(self.view.live),
            eta_s=console.eta_of(steps, self.budget, speed, due),
            bytes_sent=self.bytes_sent_total,
        )

    def _maybe_eval(self, force: bool = False) -> float | None:
        every = self.peer_cfg.eval_every
        if every and (force or self.outer.epoch % every == 0):
            started = time.monotonic()
            self.last_val = self.local.evaluate(self.outer.params, keep_working=self.work.steps > 0)
            self.last_val_epoch = self.outer.epoch
            self.clock["eval"] += time.monotonic() - started
            return self.last_val
        return None

    def _record(self, fields: dict) -> None:
        fields = dict(peer=self.peer_id, time=time.time(), **fields)
        if fields.get("state_hash") is None:
            fields["state_hash"] = self.outer.state_hash
        parts = [f"epoch {fields['epoch']:>3}", fields.get("event", "")]
        for key, fmt in (("train_loss", "loss {:.3f}"), ("val_loss", "val {:.3f}"), ("group_size", "group {}"),
                         ("allreduce_s", "allreduce {:.2f}s"), ("compute_s", "compute {:.1f}s")):
            if fields.get(key) is not None:
                parts.append(fmt.format(fields[key]))
        log.info("%s | %s", " | ".join(parts), fields["state_hash"][:8])
        self.sinks.write(fields)  # --metrics-file, TensorBoard, wandb
        self.presence.publish(ready=False)
        swarm.publish_config(self.dht, self.run_cfg.name, self.fingerprint, self.run_cfg.canonical(), CONFIG_TTL_S)

    def export(self, out_dir: str) -> None:
        """Save the global parameters as a Hugging Face model folder with its tokenizer, replacing an
        earlier export there (atomically; see :func:`p2pdiloco.export.save_hf_folder`)."""
        from p2pdiloco import corpus, export

        self.local.load(self.outer.params)
        tokenizer = corpus.load_tokenizer(self.run_cfg.data, self.run_cfg.model.vocab_size, Path(self.peer_cfg.cache_dir).expanduser())
        export.save_hf_folder(self.local.model, tokenizer, Path(out_dir), force=True)
        log.info("exported the global model of epoch %d to %s", self.outer.epoch, out_dir)

    def close(self) -> None:
        """Let the last group finish, announce leaving, stop the averager and the DHT (and p2pd)."""
        self.console.stop()  # first, so that nothing below can leave the terminal without its cursor
        if self.last_round is not None:  # stopping p2pd now could cut a member's last reply
            epoch, group, finished = self.last_round
            try:
                self.presence.wait_until_past(set(group) - {self.peer_id}, epoch,
                                              deadline=finished + self.run_cfg.averaging.next_chunk_s)
            except Exception as e:
                log.debug("waiting for the last group: %r", e)
        self.stop_requested.set()  # a round still in the background gives up waiting for peers
        self.round_runner.shutdown(wait=True, cancel_futures=True)  # and ends within round_s
        self.presence.stop()
        self.watchdog.stop()
        try:
            self.presence.publish(ready=False, leaving=True, wait=True)
        except Exception as e:  # leaving without notice only costs others a few heartbeats
            log.debug("could not announce leaving: %r", e)
        self.averager.shutdown()
        self.local.close()  # a multi-device peer's local workers
        dht.stop_dht(self.dht)
        self.sinks.close()  # last: wandb may upload for a while, and the swarm must not wait for that


def run_peer(recipe: Recipe, **kwargs) -> int:
    """Run a peer until ``max_epochs`` or SIGINT/SIGTERM; returns the final epoch."""
    stop, main_pid = threading.Event(), os.getpid()

    def request_stop(signum, _frame):
        if os.getpid() != main_pid:  # a forked hivemind process inherited this handler: die as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        again = " (Ctrl+C again to quit at once)" if os.environ.get(supervise.ENV) == "1" else ""
        log.info("%s received: finishing the current round, then leaving%s", signal.Signals(signum).name, again)
        stop.set()

    # Before the start: a signal while the DHT is starting would otherwise kill this process and
    # orphan the DHT process and p2pd it already spawned. Starting is bounded (bootstrap_s).
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    peer = Peer(recipe, stop_requested=stop, **kwargs)
    # Again: hivemind's averager sets SIGINT to "ignore" in this process when it starts, which
    # would make a peer without a terminal (nohup, a service, kill -INT) deaf to SIGINT.
    signal.signal(signal.SIGINT, request_stop)
    try:
        peer.run()
        if peer.max_epochs is not None and not stop.is_set():
            log.info("the run reached epoch %d (--max-epochs): leaving", peer.max_epochs)
        if peer.export_dir:
            peer.export(peer.export_dir)
    finally:
        try:
            if recipe.peer.checkpoint_dir:
                peer.save_checkpoint(logging.INFO)  # on every exit, Ctrl+C and SIGTERM included
        finally:
            peer.close()
    return peer.outer.epoch
