"""A peer of a p2pdiloco run: the DiLoCo loop over the swarm.

Each epoch (see :meth:`Peer.run`, the whole algorithm on one screen):

1. run inner AdamW steps from the global parameters theta_e: ``inner_steps`` (H), or with dynamic
   local updates H x (our speed / the fastest peer's), so peers of unequal speed finish together;
2. pseudo-gradient delta = theta_e - theta_local;
3. average delta with the same-epoch peers (consistent all-reduce, weighted by tokens), in the
   background while the next epoch's inner steps already run (overlap);
4. outer step (Nesterov, delayed Nesterov, SGD or SlowMo) -> theta_{e+1}, identical on every
   member; move the model onto it, keeping the steps trained while the round ran (rebase).

A failed round is never applied: its work stays and goes with the next attempt. A peer that is
behind or on a losing fork downloads the swarm's state and rebases its work onto it. A peer applies
an outer step on its own delta only when it is alone in the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from p2pdiloco import auth, checkpoint, console, faults, metrics, nat, pace, supervise, swarm
from p2pdiloco.averaging import PseudoGradientAverager, RoundResult
from p2pdiloco.config import Recipe
from p2pdiloco.errors import AveragingFailed, CheckpointError, OutOfMemory, StateDownloadFailed, is_out_of_memory
from p2pdiloco.outer import OuterState, flatten_parameters, load_flat_parameters

log = logging.getLogger("p2pdiloco")

CONFIG_TTL_S = 3600.0  # the run config record's lifetime; every peer refreshes it each epoch


@dataclasses.dataclass
class PendingRound:
    """A round running in the background: its future, what was sent, and what it was measured to."""

    delta: torch.Tensor  # the pseudo-gradient sent (error feedback included)
    base: torch.Tensor  # the local parameters it was measured to: the rebase point when it lands
    sent: pace.Work  # the work it carries
    future: Future | None = None
    waiting_alone: bool = True  # no other peer at our state is ready yet: the main loop trains on
    stage: str = "waiting for peers"  # for the console view: "averaging" once the all-reduce starts
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def refresh(self, delta: torch.Tensor, base: torch.Tensor, sent: pace.Work) -> bool:
        """Send this instead, if the round is still waiting for a peer to be ready."""
        with self.lock:
            if self.waiting_alone:
                self.delta, self.base, self.sent = delta, base, sent
            return self.waiting_alone

    def close(self) -> tuple[torch.Tensor, int]:
        """No more refreshes: the pseudo-gradient and tokens this round sends."""
        with self.lock:
            self.waiting_alone = False
            return self.delta, self.sent.tokens


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
        from p2pdiloco import data

        initial_peers = swarm.validate_multiaddrs(initial_peers)
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
        prepared = data.prepare(run.data, run.model.vocab_size, cache)  # before the DHT: a slow first run must not time out peers
        self.tokenizer_files = checkpoint.tokenizer_files(prepared / data.TOKENIZER_DIR)  # saved in checkpoints, for export
        network = nat.resolve(peer.nat, host=peer.host, port=peer.port, public_host=peer.public_host,
                              initial_peers=initial_peers, timeout=peer.nat_probe_s)
        log.info("network mode: %s (%s)", network.mode, network.reason)
        self.dht = swarm.start_dht(
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
            swarm.stop_dht(self.dht)  # a refused or failed start leaves no DHT process or p2pd behind
            raise
        self.watchdog = swarm.RoutingWatchdog(self.dht, initial_peers, peer.rebootstrap_s, peer.dht_request_s)
        self.ready = False  # published: this peer finished its inner phase and waits to average
        self.heartbeat_stop = threading.Event()
        self.publish_lock = threading.Lock()  # records reach the DHT in the order they were made
        self.heartbeat_thread: threading.Thread | None = None
        self.visible_since: float | None = None  # when this peer's first progress record was published
        self.tokens_per_s = 0.0
        self.last_loss: float | None = None
        self.last_val: float | None = None
        self.last_val_epoch: int | None = None
        self.last_round: tuple[int, list[str], float] | None = None  # (epoch reached, group, when)
        self.recent_rounds: list[swarm.RoundStat] = []  # published in our record, for dashboards
        self.bytes_sent_total = 0
        self.banned: set[str] = set()  # peers caught sending non-finite values or invalid states
        self.flag_streak: dict[str, int] = {}  # consecutive rounds a robust rule flagged each peer
        self.seen: set[str] = set()  # every other peer seen live in this run...
        self.departed: set[str] = set()  # ...and those that announced leaving
        self.cut_off_since: float | None = None
        self.backups: dict[str, swarm.Progress] = {}  # coordinators keeping a copy of the state
        self.known_others: dict[str, swarm.Progress] = {}  # the last records read (for their speeds)
        self.furthest_epoch_seen = 0  # the highest epoch of any record read, leaving peers' included
        self.speedometer = pace.Speedometer(peer.emulate_speed, recipe.run.inner_steps, self.stop_requested)
        self.work = pace.Work(started_epoch=self.outer.epoch)  # trained and not yet averaged
        self.attempt_from = 0  # work.steps when the last round was started: the next waits for a budget more
        self.budget = recipe.run.inner_steps
        self.round: PendingRound | None = None
        self.round_runner = ThreadPoolExecutor(1, thread_name_prefix="round")  # one round at a time
        self.clock = dict(since=time.monotonic(), compute=0.0, eval=0.0)
        self.activity: str | None = None  # what the loop waits on (console view): None = training, "round", "downloading state"
        self.view = console.View(self, peer.console, peer.progress_every_s)  # live in a terminal, else log lines

    def _build(self, run, peer, cache: Path) -> None:
        from p2pdiloco import data, inner, model

        joined = swarm.check_fingerprint(self.dht, run.name, self.fingerprint, run.canonical(), ttl=CONFIG_TTL_S)
        log.info("peer %s %s run '%s' (config %s)", self.short_id, "joined" if joined else "started", run.name, self.fingerprint)
        self.device = model.resolve_device(peer)
        self.bf16 = model.use_bf16(peer, self.device)
        self.model = model.build_model(run.model).to(self.device)
        self.evaluate = lambda: model.evaluate(
            self.model, self.val_batches, self.device, self.bf16, micro_batch_size=peer.micro_batch_size
        )
        self.inner = inner.InnerOptimizer(self.model, run.inner, self.device, self.bf16, peer.micro_batch_size)
        # Two peers may draw the same shard; mixing the peer id into the order keeps their batches apart.
        order_seed = run.seed ^ int(hashlib.sha256(self.peer_id.encode()).hexdigest()[:8], 16)
        self.stream = data.TokenStream(run.data, run.model.vocab_size, cache, shard_key=self.peer_id, seed=order_seed)
        self.val_batches = self.stream.val_batches()
        self.outer = OuterState.for_run(flatten_parameters(self.model), run)
        self.averager = PseudoGradientAverager(
            self.dht,
            self.outer.size,
            prefix=f"{run.name}_{self.fingerprint}",
            cfg=run.averaging,
            compression=run.compression,
            target_group_size=run.target_group_size,
            min_group_size=run.min_group_size,
            state_fn=self._serve_state,
            error_feedback=run.error_feedback,
            client_mode=self.client_mode,
            aggregation=run.aggregation,
            secret=self.secret,
        )
        # Error feedback: what quantization dropped from our last contribution, sent with the next.
        self.residual = torch.zeros(self.outer.size) if run.error_feedback else None
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
        self.inner.load_state_dict(state["inner"])
        residual = state.get("residual")
        if self.residual is not None and isinstance(residual, torch.Tensor) and residual.shape == self.residual.shape:
            self.residual.copy_(residual)
        try:
            self.stream.load_state_dict(state["data"])
        except ValueError:  # another peer id (no --identity) reads another shard: start that one afresh
            log.info("data position not restored: this peer id reads another shard (use --identity to keep it)")
        self._load_global_into_model()
        self.resumed_epoch = self.outer.epoch
        log.info("resumed from %s at epoch %d", checkpoint.checkpoint_path(directory), self.outer.epoch)

    def save_checkpoint(self, level: int = logging.DEBUG) -> None:
        """Write the global state, inner optimizer and data position (atomically), with the run
        config and tokenizer that ``p2pdiloco export`` needs to rebuild the model."""
        with self.state_lock:
            state = dict(fingerprint=self.fingerprint, **self.outer.checkpoint_fields())
        state.update(inner=self.inner.state_dict(), data=self.stream.state_dict(),
                     config=self.run_cfg.canonical(), tokenizer=self.tokenizer_files)
        if self.residual is not None:
            state["residual"] = self.residual.clone()
        path = checkpoint.save(self.peer_cfg.checkpoint_dir, state)
        log.log(level, "checkpoint of epoch %d saved to %s", state["epoch"], path)

    @property
    def short_id(self) -> str:
        return self.peer_id[-6:]

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        self.view.start()
        self._start_heartbeat()
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
        loss, seconds = self.speedometer.timed(lambda: self._inner_step(step))
        self.work.add(loss, self.run_cfg.data.batch_size * self.run_cfg.data.seq_len, seconds)
        self.clock["compute"] += seconds
        self.tokens_per_s = self.speedometer.steps_per_s * self.run_cfg.data.batch_size * self.run_cfg.data.seq_len
        self.last_loss = loss
        self.budget = self._epoch_budget()  # speeds change (ours, or a faster peer joined)

    def _epoch_budget(self) -> int:
        """Inner steps before this peer's next round: H, or H scaled by our speed (DyLU)."""
        run = self.run_cfg
        if not run.dynamic_local_updates:
            return run.inner_steps
        speeds = [r.speed for r in self.known_others.values()]
        budget = pace.dylu_steps(run.inner_steps, self.speedometer.steps_per_s, speeds, run.min_inner_steps)
        self.speedometer.window = max(budget, 5)  # our speed as measured over about one epoch
        return budget

    def _measure(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(pseudo-gradient to send, the local parameters it was measured to)."""
        local = flatten_parameters(self.model)
        delta = self.outer.pseudo_gradient(local)
        if self.residual is not None:
            delta += self.residual  # error feedback: what the codec dropped last time goes now
        return delta, local

    def _start_round(self) -> None:
        delta, local = self._measure()
        if not torch.isfinite(delta).all():
            log.error("pseudo-gradient has NaN/Inf: discarding this epoch's work and re-syncing")
            self._load_global_into_model()
            self.work, self.attempt_from = pace.Work(started_epoch=self.outer.epoch), 0
            return
        self.attempt_from = self.work.steps
        self.round = PendingRound(delta, local, self.work.snapshot())
        self.round.future = self.round_runner.submit(self._average, self.round)

    def _resend(self, pending: "PendingRound") -> bool:
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
            self._publish(ready=False)
        self.budget = self._epoch_budget()

    def _inner_step(self, step: int) -> float:
        try:
            if faults.reached("inner") == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory (injected by P2PDILOCO_FAULT)")
            return self.inner.step(self.stream.next_batch().to(self.device), step)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            rows = self.peer_cfg.micro_batch_size or self.run_cfg.data.batch_size
            raise OutOfMemory(
                f"out of memory in an inner step on {self.device} ({rows} sequences of {self.run_cfg.data.seq_len} "
                f"tokens at once): set a smaller micro-batch, e.g. --set peer.micro_batch_size={max(1, rows // 2)}"
            ) from None

    def _average(self, pending: "PendingRound"):
        """One round: a RoundResult (with the average), "alone", "behind" or None (retry).

        A private outer step ("alone") only when no other live peer exists at all: a peer that is
        merely behind or slow still belongs to the run, and stepping without it would fork the state.
        """
        others = self._wait_for_peers_ready(pending)
        delta, tokens = pending.close()  # what we send is fixed from here on
        if others == "behind" or self.stop_requested.is_set():
            return "behind"  # abandon: catch up, or leave without applying anything
        if others is None:
            return None  # the DHT could not be read: not knowing who is there is not being alone
        if not others:
            return "behind" if self._run_over() else "alone"
        digest = self.outer.state_hash
        ready = [p for p, r in others.items() if r.epoch == self.outer.epoch and r.state_hash == digest and r.ready]
        if not ready:
            log.info("epoch %d: %d live peer(s), none ready to average yet; training on", self.outer.epoch, len(others))
            return None
        pending.stage = "averaging"
        try:
            return self.averager.average(
                delta,
                epoch=self.outer.epoch,
                state_hash=self.outer.state_hash,
                weight=tokens,
                gather={"peer": self.peer_id},
                expected_size=len(ready) + 1,
            )
        except AveragingFailed as e:
            log.warning("%s", e)
            self._learn_bans()
            if self.stop_requested.is_set() or self._swarm_epoch() > self.outer.epoch:
                return "behind"
            return None

    def _learn_bans(self) -> None:
        """Ignore, from now on, the peers our averager caught sending non-finite values."""
        try:
            self.banned.update(self.averager.banned())
        except Exception as e:  # the averager did not answer in time: learn them after the next round
            log.debug("could not list banned peers: %r", e)

    def _outer_step(self, result, pending: "PendingRound") -> None:
        if isinstance(result, RoundResult):
            averaged, group, event = result.average, result, "outer_step"
            if self.residual is not None and result.residual is not None:
                self.residual.copy_(result.residual)
        else:
            averaged, group, event = pending.delta, None, "solo_step"  # alone in the run: our delta is the swarm's average
            log.info("no other peer in the run: applying this peer's own pseudo-gradient")
            if self.residual is not None:
                self.residual.zero_()  # applied in full, nothing dropped
        applied_to = self.outer.epoch
        with self.state_lock:
            self.outer.step(averaged, contributions=len(group.group) if group else 1)
            digest = self.outer.state_hash
        self.averager.set_state_priority(self.outer.epoch)
        self._adopt_global(pending.base)  # keeps the steps trained while the round ran
        done, self.work, self.attempt_from = pending.sent, self.work.since(pending.sent, self.outer.epoch), 0
        if group:
            self._judge_flags(group)
            self.last_round = (self.outer.epoch, group.group, time.monotonic())
            self.bytes_sent_total += group.bytes_sent
            stat = swarm.RoundStat(epoch=self.outer.epoch, group_size=len(group.group), allreduce_s=group.seconds,
                                   bytes_sent=group.bytes_sent)
            self.recent_rounds = [*self.recent_rounds, stat][-swarm.RECENT_ROUNDS:]
        self.last_loss = sum(done.losses) / len(done.losses)
        val_loss = self._maybe_eval()
        self._record(
            dict(
                epoch=self.outer.epoch,
                event=event,
                state_hash=digest,
                group_size=len(group.group) if group else 1,
                group=group.group if group else [self.peer_id],
                inner_steps=done.steps,
                tokens=done.tokens,
                staleness=applied_to - done.started_epoch,  # outer steps between the work's base and its round
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
                val_loss=val_loss,
                **self._clock_fields(),
            )
        )
        if self.peer_cfg.checkpoint_dir and self.outer.epoch % self.peer_cfg.checkpoint_every == 0:
            self.save_checkpoint()

    def _judge_flags(self, result: RoundResult) -> None:
        """Ban, for the run, a member the reducers' robust rule flagged in ``ban_after``
        consecutive rounds with us (one flag can be an honest outlier; a streak is a pattern)."""
        limit = self.run_cfg.aggregation.ban_after
        for peer in result.group:
            self.flag_streak[peer] = self.flag_streak.get(peer, 0) + 1 if peer in result.flagged else 0
            if limit and self.flag_streak[peer] >= limit and peer not in self.banned:
                reason = f"was flagged by the robust aggregation in {self.flag_streak[peer]} consecutive rounds"
                self.banned.add(peer)
                try:
                    self.averager.ban(peer, reason)
                except Exception as e:  # the host-side ban still keeps it out of our readiness counts
                    log.warning("peer %s %s; could not tell the averager: %r", peer, reason, e)
        if result.flagged:
            log.info("robust aggregation flagged %s in this round", ", ".join(p[-6:] for p in result.flagged))

    def _clock_fields(self) -> dict:
        """Where this peer's time went since the last record: ``compute_s`` (inner steps, emulated
        slowness included), ``eval_s`` (evaluating the global model, a measurement: left out of the
        utilization), ``idle_s`` (everything else: waiting for a round, outer step, downloads)."""
        now, clock = time.monotonic(), self.clock
        self.clock = dict(since=now, compute=0.0, eval=0.0)
        busy = max(now - clock["since"] - clock["eval"], 1e-9)
        return dict(compute_s=clock["compute"], wall_s=now - clock["since"], eval_s=clock["eval"],
                    idle_s=max(0.0, busy - clock["compute"]), compute_utilization=min(1.0, clock["compute"] / busy))

    # ---------------------------------------------------------------- the swarm's state
    def _live_others(self) -> dict[str, swarm.Progress] | None:
        """Other live peers' records, or None if the DHT could not be read."""
        records = swarm.read_progress(self.dht, self.run_cfg.name, timeout=self.peer_cfg.dht_request_s, include_leaving=True)
        if records is None:
            return None
        records = self._note_records(records)
        self.departed.update(peer for peer, r in records.items() if r.leaving)
        self.backups = {peer: r for peer, r in records.items() if r.backup and not r.leaving}
        others = self.known_others
        self.seen.update(others)
        if others:
            self.cut_off_since = None
        if others or self._may_be_alone():
            return others
        return None  # cut off from the swarm: not knowing who is there is not being alone

    def _may_be_alone(self) -> bool:
        """No other live record: is this peer alone, or cut off from a swarm that goes on?

        Cut off (not every peer seen so far announced leaving, and no DHT neighbour answers a
        ping) a peer must not step alone: it would publish a state of its own as the run's.
        It trains on and retries; after ``alone_after_s`` it assumes the swarm is gone.
        """
        if self.seen <= self.departed:
            return True
        try:
            neighbours = swarm.reachable_neighbours(self.dht, self.peer_cfg.dht_request_s)
        except Exception:
            return False
        now = time.monotonic()
        if neighbours:
            self.cut_off_since = None
            return True
        if self.cut_off_since is None:
            self.cut_off_since = now
            log.warning("no DHT neighbour left (network cut?): not stepping alone for up to %.0f s", self.peer_cfg.alone_after_s)
        if now - self.cut_off_since < self.peer_cfg.alone_after_s:
            return False
        log.warning("cut off for %.0f s: assuming the swarm is gone and training alone", now - self.cut_off_since)
        self.seen.clear()
        return True

    def _swarm_epoch(self) -> int:
        return max((r.epoch for r in (self._live_others() or {}).values()), default=-1)

    def _wait_for_peers_ready(self, pending: "PendingRound"):
        """Wait (bounded) for the live peers at or behind our epoch to be ready.

        Returns their records, "behind" if a peer is ahead of us, or None if the DHT was unreadable.

        Entering matchmaking together lets all same-epoch peers land in one group. A peer behind
        us may be one that just finished the same round but has not published yet. The grace time
        (``grace_s``) runs from the moment a round can be held (another peer at our state is ready):
        stragglers get that long to join it. With overlap, while no other peer is ready there is
        no round to hold and nobody waits on us, so we keep waiting while the main loop trains on
        (and refreshes what we will send, see :meth:`_resend`), for up to ``round_s``; then the
        attempt ends and the next one announces us again. Without overlap the peer idles while it
        waits, so the grace time runs from the start.
        """
        averaging = self.run_cfg.averaging
        started = time.monotonic()
        grace_from = None if self.run_cfg.overlap else started
        self._publish(ready=True)
        while True:
            others = self._live_others()
            if others is not None and (
                any(r.epoch > self.outer.epoch for r in others.values())
                or self._winning_state(others) not in (None, self.outer.state_hash)
            ):
                return "behind"  # ahead of us, or the same epoch on another fork that wins: download it
            if grace_from is None and others and any(
                r.ready and r.epoch == self.outer.epoch and r.state_hash == self.outer.state_hash for r in others.values()
            ):
                grace_from = time.monotonic()
            if grace_from is not None:
                pending.close()  # a round can be held: what we send is fixed
            # "Alone" only after we have been visible in the DHT for a heartbeat: a peer that started
            # at the same moment is then visible to us, or sees us (two simultaneous starters
            # must not both conclude they are alone and fork).
            unconfirmed_alone = others == {} and time.monotonic() < self.visible_since + self.peer_cfg.heartbeat_s
            waiting = others is None or unconfirmed_alone or [r for r in others.values() if r.epoch < self.outer.epoch or not r.ready]
            now = time.monotonic()
            over = now > grace_from + averaging.grace_s if grace_from is not None else now > started + averaging.round_s
            if not waiting or over or self.stop_requested.is_set():
                return others
            self.stop_requested.wait(0.2)  # poll the DHT: peers announce readiness there, not to us

    def _sync_with_swarm(self) -> None:
        """Download the swarm's state if it is ahead of ours or if ours is a minority fork."""
        others = self._live_others()
        if others is None:
            return  # the DHT is unreadable right now: try again next epoch
        if not others:
            self._restore_from_backup()  # alone: maybe the run went on before us and a backup kept it
            return
        epoch = max(r.epoch for r in others.values())
        if epoch < self.outer.epoch:
            return
        target_hash = self._winning_state(others, epoch)
        if epoch == self.outer.epoch and target_hash in (None, self.outer.state_hash):
            return  # ours wins, or peers still behind could change the outcome: judge it later
        if target_hash is None:  # ahead of us, not settled yet: the leading state, judged again there
            target_hash = self._winning_state(others, epoch, settled=False)
        donors = sorted(p for p, r in others.items() if r.epoch == epoch and r.state_hash == target_hash)
        reason = "behind" if epoch > self.outer.epoch else "fork"
        log.info("epoch %d, swarm at %d (%s): downloading the state from %d peer(s)", self.outer.epoch, epoch, reason, len(donors))
        self._download_state(donors, min_epoch=epoch, reason=reason)

    def _restore_from_backup(self) -> None:
        """With no live peer, continue from a coordinator's backup if it is ahead of this peer."""
        ahead = {p: r for p, r in self.backups.items() if r.epoch > self.outer.epoch}
        if ahead:
            epoch = max(r.epoch for r in ahead.values())
            log.info("epoch %d, no live peer, a backup at %d: downloading it", self.outer.epoch, epoch)
            self._download_state(sorted(p for p, r in ahead.items() if r.epoch == epoch), min_epoch=epoch, reason="backup")

    def _winning_state(self, others: dict[str, swarm.Progress], epoch: int | None = None, settled: bool = True) -> str | None:
        """The state digest the swarm converges on at ``epoch`` (default: ours).

        Two groups at one epoch apply different averages (a fork). The rule, applied by every peer
        to the same records: the digest held by the most peers wins; a tie goes to the smallest.
        Peers still behind ``epoch`` may be finishing a round at it with yet another digest, so
        with ``settled`` the answer is None until the outcome no longer depends on where they land:
        two peers judging from such partial views once downloaded each other's branch, keeping the
        fork alive another epoch.
        """
        epoch = self.outer.epoch if epoch is None else epoch
        hashes = Counter(r.state_hash for r in others.values() if r.epoch == epoch)
        if epoch == self.outer.epoch:
            hashes[self.outer.state_hash] += 1
        winner = min(hashes, key=lambda h: (-hashes[h], h))
        if settled and not swarm.fork_settled(hashes, winner, pending=sum(r.epoch < epoch for r in others.values())):
            return None
        return winner

    def _download_state(self, donors: list[str], min_epoch: int, reason: str) -> None:
        """Catch up from one of ``donors`` (``reason`` goes into the record); the console shows it."""
        self.activity = "downloading state"
        try:
            self._try_donors(donors, min_epoch, reason)
        finally:
            self.activity = None

    def _try_donors(self, donors: list[str], min_epoch: int, reason: str) -> None:
        cfg = self.peer_cfg
        for attempt in range(cfg.state_download_attempts):
            try:
                donor, meta, tensors = self.averager.download_state(donors, timeout=cfg.state_download_s)
            except StateDownloadFailed as e:
                log.warning("state download attempt %d failed: %s", attempt + 1, e)
                continue
            if isinstance(meta, dict) and isinstance(meta.get("epoch"), int) and meta["epoch"] < min_epoch:
                log.info("%s now serves epoch %d (restarted?); trying another donor", donor[-6:], meta["epoch"])
                donors = [d for d in donors if d != donor] or donors
                continue
            try:
                # Every check of the header and tensors (outer.validate_state), digest included, before
                # the lock: a donor's state is adopted whole and verified or not at all.
                header = self.outer.validate(meta, tensors, fingerprint=self.fingerprint)
                previous = self.outer.params.clone()  # the base our unsent work was trained from
                with self.state_lock:
                    self.outer.adopt(header, tensors)
            except StateDownloadFailed as e:
                # Not a network hiccup: the donor holds or sends a broken state. Ignore it from now
                # on, or this peer would keep trying it instead of training.
                self.banned.add(donor)
                try:
                    self.averager.ban(donor, f"served an invalid state ({e})")
                except Exception:  # the host-side ban above already keeps it out of our decisions
                    log.warning("peer %s served an invalid state (%s): ignoring it for the rest of the run", donor, e)
                donors = [d for d in donors if d != donor]
                if not donors:
                    break
                continue
            else:
                self.averager.set_state_priority(self.outer.epoch)
                self._adopt_global(previous)  # our work so far goes, stale, into our next round
                self._record(dict(epoch=self.outer.epoch, event="downloaded", reason=reason, state_hash=header.state_hash,
                                  donor=donor, val_loss=self._maybe_eval()))
                log.info("now at epoch %d (state from %s)", self.outer.epoch, donor[-6:])
                return
        log.warning("could not download the swarm's state; continuing and retrying next epoch")

    def _serve_state(self):
        with self.state_lock:
            return dict(self.outer.meta(), fingerprint=self.fingerprint), [t.clone() for t in self.outer.tensors()]

    def _load_global_into_model(self) -> None:
        load_flat_parameters(self.model, self.outer.params.to(self.device))

    def _adopt_global(self, base: torch.Tensor) -> None:
        """Move the model onto the new global parameters, keeping the progress it made since
        ``base`` (the local parameters our last pseudo-gradient was measured to, or the previous
        global parameters): see :func:`p2pdiloco.pace.rebase`."""
        local = flatten_parameters(self.model)
        load_flat_parameters(self.model, pace.rebase(local, base, self.outer.params).to(self.device))

    # ---------------------------------------------------------------- bookkeeping
    def _done(self) -> bool:
        return self.stop_requested.is_set() or self._run_over()

    def _run_over(self) -> bool:
        """``--max-epochs N``: this peer, or any peer of the run (those that left included), reached
        epoch N. A straggler still behind then has nothing left to contribute to, and stepping
        alone from its older state would only fork the finished run."""
        return self.max_epochs is not None and max(self.outer.epoch, self.furthest_epoch_seen) >= self.max_epochs

    def _start_heartbeat(self) -> None:
        """Publish this peer's record every ``heartbeat_s`` from a thread of its own.

        The record's lifetime is 3 heartbeats, so it must be refreshed however long the main loop
        spends in one place (a round, an evaluation, a state download): otherwise a peer busy in
        a slow round looks dead, and a newcomer that sees nobody would step alone and fork the
        run. Only a dead or frozen process stops refreshing it.
        """
        def beat():
            while not self.heartbeat_stop.wait(self.peer_cfg.heartbeat_s):
                try:
                    self._publish()
                    self._refresh_speeds()
                except Exception as e:  # the next beat tries again; a dead DHT shows up elsewhere
                    log.debug("heartbeat: %r", e)

        self._publish(ready=False)
        self.heartbeat_thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self.heartbeat_thread.start()

    def _refresh_speeds(self) -> None:
        """Read the other peers' records for their speeds, so that DyLU step budgets follow them
        within a heartbeat (a newcomer learns it is the slowest during its first epoch), and for
        the furthest epoch the run reached (see :meth:`_run_over`)."""
        records = swarm.read_progress(self.dht, self.run_cfg.name, timeout=self.peer_cfg.dht_request_s, include_leaving=True)
        if records is not None:
            self._note_records(records)

    def _note_records(self, records: dict[str, swarm.Progress]) -> dict[str, swarm.Progress]:
        """The other peers' records (banned ones left out). Notes the furthest epoch a training peer
        reached, leaving ones included (farewell records expire within 3 heartbeats: note it before
        they do), and the live training peers (``known_others``, whose speeds set DyLU budgets)."""
        records = {peer: r for peer, r in records.items() if peer != self.peer_id and peer not in self.banned}
        self.furthest_epoch_seen = max([self.furthest_epoch_seen, *(r.epoch for r in records.values() if not r.backup)])
        self.known_others = {peer: r for peer, r in records.items() if not r.leaving and not r.backup}
        return records

    def _publish(self, *, ready: bool | None = None, leaving: bool = False, wait: bool = False) -> None:
        """Store this peer's progress record (``ready``: None keeps the current flag)."""
        with self.publish_lock:
            self._publish_locked(ready, leaving, wait)

    def _publish_locked(self, ready: bool | None, leaving: bool, wait: bool) -> None:
        # Called from the loop and from the heartbeat thread: hivemind's DHT client sends each
        # request as one small message on its pipe (its averager process shares that pipe too).
        if ready is not None:
            self.ready = ready
        with self.state_lock:  # epoch and digest of the same state
            epoch, digest = self.outer.epoch, self.outer.state_hash
        record = swarm.Progress(
            peer=self.peer_id,
            epoch=epoch,
            state_hash=digest,
            tokens_per_s=self.tokens_per_s,
            speed=self.speedometer.steps_per_s,
            train_loss=self.last_loss,
            val_loss=self.last_val,
            val_epoch=self.last_val_epoch,
            shard=self.stream.shard,
            time=time.time(),
            ready=self.ready,
            leaving=leaving,
            rounds=self.recent_rounds,
            bytes_sent_total=self.bytes_sent_total,
        )
        timeout = self.peer_cfg.dht_request_s if wait else None
        swarm.publish_progress(self.dht, self.run_cfg.name, record, ttl=3 * self.peer_cfg.heartbeat_s, timeout=timeout)
        if self.visible_since is None:
            self.visible_since = time.monotonic()

    def _maybe_eval(self, force: bool = False) -> float | None:
        every = self.peer_cfg.eval_every
        if every and (force or self.outer.epoch % every == 0):
            started = time.monotonic()
            local = flatten_parameters(self.model) if self.work.steps else None
            self._load_global_into_model()  # evaluate the global parameters, not our working copy
            self.last_val, self.last_val_epoch = self.evaluate(), self.outer.epoch
            if local is not None:
                load_flat_parameters(self.model, local.to(self.device))
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
        self._publish(ready=False)
        swarm.publish_config(self.dht, self.run_cfg.name, self.fingerprint, self.run_cfg.canonical(), CONFIG_TTL_S)

    def export(self, out_dir: str) -> None:
        """Save the global parameters as a Hugging Face model folder with its tokenizer, replacing an
        earlier export there (atomically; see :func:`p2pdiloco.export.save_hf_folder`)."""
        from p2pdiloco import data, export

        self._load_global_into_model()
        tokenizer = data.load_tokenizer(self.run_cfg.data, self.run_cfg.model.vocab_size, Path(self.peer_cfg.cache_dir).expanduser())
        export.save_hf_folder(self.model, tokenizer, Path(out_dir), force=True)
        log.info("exported the global model of epoch %d to %s", self.outer.epoch, out_dir)

    def _let_last_group_finish(self) -> None:
        """Wait until the members of our last round have its result, bounded by ``next_chunk_s``.

        A member may still be reading our reducer's reply when we finish: stopping p2pd then
        drops those bytes and fails that member's round (seen on loaded machines at the last
        epoch of a run, when every peer stops right after its round). Members show they are done
        by publishing the new epoch (or leaving).
        """
        if self.last_round is None:
            return
        epoch, group, finished = self.last_round
        deadline = finished + self.run_cfg.averaging.next_chunk_s
        pending = set(group) - {self.peer_id}
        while pending and time.monotonic() < deadline:
            others = self._live_others()
            if others is not None:  # a member whose record expired has died: nothing to wait for
                pending = {p for p in pending if p in others and others[p].epoch < epoch and not others[p].leaving}
            if pending:
                time.sleep(0.2)

    def close(self) -> None:
        """Let the last group finish, announce leaving, stop the averager and the DHT (and p2pd)."""
        self.view.stop()  # first, so that nothing below can leave the terminal without its cursor
        try:
            self._let_last_group_finish()
        except Exception as e:
            log.debug("waiting for the last group: %r", e)
        self.stop_requested.set()  # a round still in the background gives up waiting for peers
        self.round_runner.shutdown(wait=True, cancel_futures=True)  # and ends within round_s
        self.heartbeat_stop.set()
        if self.heartbeat_thread is not None:
            self.heartbeat_thread.join(timeout=self.peer_cfg.dht_request_s)
        self.watchdog.stop()
        try:
            self._publish(ready=False, leaving=True, wait=True)
        except Exception as e:  # leaving without notice only costs others a few heartbeats
            log.debug("could not announce leaving: %r", e)
        self.averager.shutdown()
        swarm.stop_dht(self.dht)
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
