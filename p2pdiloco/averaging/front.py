"""What a peer calls to average: :class:`PseudoGradientAverager` and its :class:`RoundResult`.

:class:`PseudoGradientAverager` lives in the peer's (host) process. It owns one flat fp32 buffer
(one buffer so a failure can never leave some tensors averaged and others not), keys matchmaking
by the epoch and state (only peers holding the same state can group), puts a hard deadline on
every round and measures the bytes actually sent and received. It also serves the outer state to
newcomers under the caller's lock and downloads it from a chosen list of peers. The work itself
runs in the averager process (:mod:`p2pdiloco.averaging.process`), reached through hivemind's pipe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Sequence

import torch
from hivemind.compression import NoCompression
from hivemind.p2p import PeerID
from hivemind.utils import MPFuture, get_dht_time

from p2pdiloco import faults, plan as planning
from p2pdiloco.auth import RunSecret
from p2pdiloco.averaging.process import _Averager
from p2pdiloco.averaging.runner import DECODE_S, ENCODE_S, RECEIVED, SENT
from p2pdiloco.averaging.wire import DONE_TTL_S, commit_state, done_key, group_bits
from p2pdiloco.codecs import make_codec
from p2pdiloco.config import AggregationConfig, AveragingConfig
from p2pdiloco.errors import AveragingFailed, StateDownloadFailed

log = logging.getLogger(__name__)

MEMBER_TTL_S = 6 * 3600.0  # a membership proof record's lifetime; republished every round


@dataclasses.dataclass
class RoundResult:
    """What one successful round produced."""

    average: torch.Tensor  # the weighted mean, byte-identical on every member of the group
    group: list[str]  # peer ids of the members, in the group's order
    gathered: dict[str, Any]  # peer id -> what that member passed as ``gather``
    seconds: float
    bytes_sent: int  # measured at the all-reduce: the serialized messages this peer sent
    bytes_received: int
    encode_s: float  # time spent encoding (our parts, the averages we reduced) and decoding
    decode_s: float
    residual: torch.Tensor | None = None  # error feedback: what quantizing our parts dropped
    flagged: list[str] = dataclasses.field(default_factory=list)  # members a reducer's robust rule flagged
    # Peers whose pseudo-gradients are in the average (the epoch's state): the group, until
    # averages reach across groups (docs/scaling.md).
    contributors: list[str] = dataclasses.field(default_factory=list)
    # Two-level: peers the round's decisions name as senders of non-finite or malformed values;
    # every peer holding those decisions reads the same names and bans them alike.
    refused: list[str] = dataclasses.field(default_factory=list)
    # Two-level: per peer, the share of its pseudo-gradient (by values) in the state, where a dead
    # owner's column left part of it out (carried to the next round); empty: the contributors' all.
    included: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PlanRoundResult:
    """What one two-level round (:meth:`PseudoGradientAverager.average_plan`) gave this peer."""

    average: torch.Tensor  # the decided cells' means, zero where a cell was not decided
    outcome: planning.Outcome  # apply or not, contributors, what of our work to carry over
    decisions: dict  # cell -> the peers whose work that cell holds
    seconds: float
    bytes_sent: int
    bytes_received: int
    encode_s: float = 0.0  # encoding our columns, partials and decisions; decoding what we received
    decode_s: float = 0.0
    residual: torch.Tensor | None = None  # error feedback: what quantizing our columns dropped
    flagged: list[str] = dataclasses.field(default_factory=list)  # members an owner's robust rule flagged
    # cells we could get from neither their holder nor every peer we asked (or a round past the
    # partners' cutoff, counted as one): then we step not
    doubtful: int = 0
    refused: list[str] = dataclasses.field(default_factory=list)  # senders of unusable values, named in decisions


class PseudoGradientAverager:
    """Averages one flat pseudo-gradient per epoch with same-epoch peers, consistently.

    :param dht: a running ``hivemind.DHT``
    :param size: number of fp32 values in the pseudo-gradient
    :param prefix: averaging namespace; include the run fingerprint so mismatched peers never meet
    :param cfg: the run's averaging timeouts
    :param compression: the run's codec name (see :mod:`p2pdiloco.codecs`)
    :param state_fn: returns ``(metadata, [tensors])`` of the current outer state; called from a
        background thread when a newcomer downloads the state, so it must take the state lock
    :param error_feedback: return, with each round, what quantizing our parts dropped
    :param aggregation: how the slices this peer reduces are combined (:mod:`p2pdiloco.robust`)
    :param secret: a closed run's secret: only members join our groups, serve us or get our state
    """

    def __init__(
        self,
        dht,
        size: int,
        *,
        prefix: str,
        cfg: AveragingConfig,
        compression: str,
        target_group_size: int,
        min_group_size: int,
        state_fn: Callable[[], tuple[dict, Sequence[torch.Tensor]]],
        error_feedback: bool = False,
        client_mode: bool = False,
        aggregation: AggregationConfig | None = None,
        secret: RunSecret | None = None,
    ):
        self.cfg = cfg
        self.target_group_size = target_group_size
        self._counted = torch.zeros(4, dtype=torch.float64)  # traffic counters at the last round's result
        # Rounds that may have ended one-sided here. groups: complete here but not confirmed by every
        # member (not applied); two_level: applied with a cell left zero that an unreachable holder may hold.
        self.one_sided = 0
        self._averager = _Averager(
            [torch.zeros(size, dtype=torch.float32)],  # moved to shared memory; read and written under its lock
            dht,
            start=True,
            prefix=prefix,
            state_fn=state_fn,
            codec=make_codec(compression),
            error_feedback=error_feedback,
            aggregation=aggregation or AggregationConfig(),
            secret=secret,
            target_group_size=target_group_size,
            min_group_size=min_group_size,
            min_matchmaking_time=cfg.matchmaking_s,
            request_timeout=cfg.request_s,
            allreduce_timeout=cfg.allreduce_s,
            next_chunk_timeout=cfg.next_chunk_s,
            state_compression=NoCompression(),  # state is never quantized: newcomers must be bit-identical
            client_mode=client_mode,
            declare_state_period=max(cfg.matchmaking_s, 5.0),
            shutdown_timeout=cfg.next_chunk_s,
        )
        self._token = secret.token(self._averager.peer_id.to_bytes()) if secret is not None else None
        self._publish_membership(wait=True)

    @classmethod
    def for_run(cls, dht, run, size: int, *, state_fn: Callable[[], tuple[dict, Sequence[torch.Tensor]]],
                secret: RunSecret | None = None, client_mode: bool = False,
                donor_only: bool = False) -> "PseudoGradientAverager":
        """The averager of a run (a :class:`~p2pdiloco.config.RunConfig`), as every peer and a
        coordinator's backup build it: the namespace carries the run's fingerprint, so peers of
        another config never meet, and everything else comes from the run config. ``donor_only``:
        it serves and fetches states but never averages (a backup), so it keeps no error-feedback
        buffer (the size of the model)."""
        return cls(
            dht, size, prefix=f"{run.name}_{run.fingerprint()}", cfg=run.averaging, compression=run.compression,
            target_group_size=run.target_group_size, min_group_size=run.min_group_size, state_fn=state_fn,
            error_feedback=run.error_feedback and not donor_only, client_mode=client_mode, aggregation=run.aggregation, secret=secret,
        )

    @property
    def peer_id(self) -> str:
        return self._averager.peer_id.to_base58()

    def _publish_membership(self, wait: bool = False) -> None:
        """Closed runs: publish our proof, so donors serve us the state and newcomers trust us as a donor."""
        if self._token is None:
            return
        future = self._averager.dht.store(
            f"{self._averager.prefix}.members", subkey=self.peer_id, value=self._token,
            expiration_time=get_dht_time() + MEMBER_TTL_S, return_future=True,
        )
        if wait:
            try:
                future.result(timeout=self.cfg.request_s)
            except Exception as e:  # republished every round; a donor may refuse us until then
                log.warning("could not publish this peer's membership proof yet: %r", e)

    def ban(self, peer: str, reason: str) -> None:
        """Refuse ``peer`` in this peer's groups for the rest of the run (logged with ``reason``)."""
        self._call("_ban_by_host", peer=peer, reason=reason)

    def banned(self) -> list[str]:
        """Peers this peer's averager refuses: those that sent non-finite values, or were banned."""
        return self._call("_list_banned")

    def traffic(self) -> dict[str, float]:
        """Totals since start: ``bytes_sent``, ``bytes_received``, ``encode_s``, ``decode_s``."""
        t = self._averager.traffic.clone()
        return dict(bytes_sent=float(t[SENT]), bytes_received=float(t[RECEIVED]), encode_s=float(t[ENCODE_S]), decode_s=float(t[DECODE_S]))

    def set_state_priority(self, epoch: int) -> None:
        """Newcomers try donors with the highest epoch first. A client-mode averager serves no
        state (others cannot dial it), so it has no priority to publish (hivemind refuses one)."""
        if not self._averager.client_mode:
            self._averager.state_sharing_priority = float(epoch)

    def state_sharers(self, timeout: float | None = None) -> set[str] | None:
        """Peers of this averaging namespace that currently declare they serve their state.

        hivemind's averagers declare it in the DHT every ``declare_state_period``; client-mode
        averagers never do. None when the DHT could not be read in time.
        """
        key = f"{self._averager.prefix}.all_averagers"
        try:
            found = self._averager.dht.get(key, latest=True, return_future=True).result(timeout=timeout or self.cfg.request_s)
        except Exception as e:
            log.debug("could not read the state sharers: %r", e)
            return None
        if found is None or not isinstance(found.value, dict):
            return set()
        sharers = set()
        for subkey, item in found.value.items():
            if isinstance(getattr(item, "value", None), (int, float)) and isinstance(subkey, bytes):
                try:
                    sharers.add(PeerID(subkey).to_base58())
                except Exception:  # a malformed subkey from a stranger: not a donor
                    continue
        return sharers

    def _hand_over(self, pseudo_gradient: torch.Tensor) -> None:
        """Put what we send into the averager's shared buffer (either protocol)."""
        with self._averager.get_tensors() as (buffer,):
            buffer.copy_(pseudo_gradient)
            fault = faults.reached("send")
            if fault in faults.CORRUPTIONS:  # tests: what a broken or hostile peer would send
                buffer.copy_(faults.corrupt(buffer, fault))
        if not self._averager.is_alive():
            raise AveragingFailed("the averager process is not running")

    def average(
        self,
        pseudo_gradient: torch.Tensor,
        *,
        epoch: int,
        state_hash: str,
        weight: float,
        gather: dict,
        expected_size: int | None = None,
    ) -> RoundResult:
        """All-reduce ``pseudo_gradient`` with the peers holding the same state (``epoch``,
        ``state_hash``); the result holds the average.

        The matchmaking key is derived from both, and every member checks the others' gathered
        values, so peers on different forks of the same epoch never average together.
        ``expected_size`` (at most the run's target group size): how many peers are known to be
        ready for this state, so the group starts as soon as they all joined.

        A complete result is returned only once every member confirmed holding it too (see
        :meth:`_commit`): a round never ends with some members stepping and others retrying.

        Raises :class:`AveragingFailed` if no group formed, a member failed, the result was partial,
        a member did not confirm within ``cfg.commit_s``, or the deadline ``cfg.round_s`` passed.
        """
        cfg = self.cfg
        self._hand_over(pseudo_gradient)
        try:  # hivemind's own setters wait without a bound: go through _call
            self._call("_set_group_bits", group_bits=group_bits(epoch, state_hash))  # same state only
            self._call("_set_expected_group_size", size=min(expected_size or self.target_group_size, self.target_group_size))
        except Exception as e:
            raise AveragingFailed(f"the averager did not answer: {e!r}") from None
        started = time.monotonic()
        self._publish_membership()
        proof = {} if self._token is None else {"member": self._token}
        control = self._averager.step(
            gather=dict(gather, epoch=epoch, state_hash=state_hash, nonce=os.urandom(8).hex(), **proof),
            weight=float(weight), timeout=2 * cfg.matchmaking_s,
            # No retry inside the step: a member whose all-reduce failed while the others succeeded
            # would average again, at the same epoch, with another group: a fork. The peer's loop
            # retries instead, after checking whether the swarm moved on.
            allow_retries=False, wait=False,
        )
        faults.reached("matchmaking")
        try:
            gathered = control.result(timeout=cfg.round_s)
        except Exception as e:
            control.cancel()
            raise AveragingFailed(f"round of epoch {epoch} failed: {type(e).__name__}: {e}") from None
        if not gathered:
            raise AveragingFailed(f"round of epoch {epoch} failed: no group")
        gathered = {peer.to_base58(): data for peer, data in gathered.items()}
        states = {(data.get("epoch"), data.get("state_hash")) if isinstance(data, dict) else None for data in gathered.values()}
        if states != {(epoch, state_hash)}:
            raise AveragingFailed(f"group mixed states {sorted(map(str, states))}; round discarded")
        # Counted since the previous round's result, not since this round's start: a reducer's
        # last replies can still be on their way when its own result is complete, and their bytes
        # then count in the next round instead of being lost. Totals over a run are exact.
        now = self._averager.traffic.clone()
        traffic, self._counted = now - self._counted, now
        with self._averager.get_tensors() as (buffer,):
            average = buffer.clone()
        try:
            flagged = self._call("_take_flagged")
        except Exception as e:  # only the ban decisions miss this round's flags
            log.debug("could not read the flagged members: %r", e)
            flagged = []
        if not torch.isfinite(average).all():  # e.g. our own slice, if we were the one sending NaN
            raise AveragingFailed(f"round of epoch {epoch} produced non-finite values; round discarded")
        try:
            banned = self.banned()
        except Exception as e:  # then a member left out for garbage holds the commit up until commit_s
            log.debug("could not read the banned peers: %r", e)
            banned = []
        self._commit(epoch, gathered, excused=banned)
        return RoundResult(
            average=average,
            group=sorted(gathered),
            gathered=gathered,
            seconds=time.monotonic() - started,
            bytes_sent=int(traffic[SENT]),
            bytes_received=int(traffic[RECEIVED]),
            encode_s=float(traffic[ENCODE_S]),
            decode_s=float(traffic[DECODE_S]),
            residual=None if self._averager.residual is None else self._averager.residual.clone(),
            flagged=flagged,
            contributors=sorted(set(gathered) - set(banned)),
        )

    def average_plan(self, pseudo_gradient: torch.Tensor, plan: planning.Plan, *, weight: float,
                     quorum: float = 0.5) -> PlanRoundResult:
        """One two-level round (docs/scaling.md) with the peers of ``plan``, which every one of them
        computed from the same ready set (:func:`p2pdiloco.plan.make_plan`): no matchmaking.

        Every message waits at most ``cfg.next_chunk_s`` of silence, the whole round at most
        ``cfg.round_s``. The result says whether to step (:func:`p2pdiloco.plan.assemble`: the
        decided cells hold more than ``quorum`` of the values) and which spans of our own
        pseudo-gradient no decision included (carry them into the next round).
        """
        cfg = self.cfg
        if self.peer_id not in plan.peers:
            raise AveragingFailed(f"this peer is not in the plan of epoch {plan.epoch}")
        self._hand_over(pseudo_gradient)
        started = time.monotonic()
        faults.reached("matchmaking")  # no matchmaking here: the point where the round is asked for
        try:
            answer = self._call("_two_level_round", cfg.round_s + cfg.request_s, groups=[list(g) for g in plan.groups],
                                clients=sorted(plan.clients),
                                plan_id=plan.plan_id, epoch=plan.epoch, digest=plan.digest, weight=float(weight),
                                silence_s=cfg.next_chunk_s, deadline_s=cfg.round_s, quorum=quorum)
        except Exception as e:
            raise AveragingFailed(f"two-level round of epoch {plan.epoch} failed: {type(e).__name__}: {e}") from None
        decisions = {tuple(cell): frozenset(members) for cell, members in answer["decisions"].items()}
        outcome = planning.assemble(plan, self.peer_id, {c: planning.Decision(c, m) for c, m in decisions.items()},
                                    pseudo_gradient.numel(), quorum)
        # Since the previous round's result, as in :meth:`average`: forwards and repair answers
        # can leave or arrive after our own result, and then count in the next round's record.
        now = self._averager.traffic.clone()
        traffic, self._counted = now - self._counted, now
        with self._averager.get_tensors() as (buffer,):
            average = buffer.clone()
        doubtful = int(answer.get("doubtful", 0))
        if outcome.apply and doubtful:
            # A cell we could get from neither its holder nor every peer we peeked at: we are
            # likelier the one cut off. Step not (carry everything) and catch up with the swarm.
            outcome = planning.assemble(plan, self.peer_id, {}, pseudo_gradient.numel(), quorum)
        elif outcome.apply and answer.get("unsure"):
            # Applied with a cell left zero that a holder we could not ask may hold: possibly
            # one-sided (the fork rule settles it if it was); counted, as the groups' commit counts its own.
            self.one_sided += 1
        return PlanRoundResult(
            average=average, outcome=outcome, decisions=decisions, seconds=time.monotonic() - started,
            bytes_sent=int(traffic[SENT]), bytes_received=int(traffic[RECEIVED]),
            encode_s=float(traffic[ENCODE_S]), decode_s=float(traffic[DECODE_S]),
            residual=None if self._averager.residual is None else self._averager.residual.clone(),
            flagged=list(answer.get("flagged", [])), refused=list(answer.get("refused", [])), doubtful=doubtful,
        )

    def _commit(self, epoch: int, gathered: dict[str, Any], excused: Sequence[str]) -> None:
        """Confirm that we hold the whole result, and wait (bounded by ``cfg.commit_s``) until every
        other member confirmed too; raise :class:`AveragingFailed` otherwise.

        Without this, a link that fails while the averages are on their way ends a round one-sided:
        a member that received every slice steps, while the one that missed a slice fails and
        averages again, at the same epoch, with whoever is left: two states at one epoch. With it,
        a member steps only when every member holds the same result, so a failure on the way back
        makes the whole group retry.

        Our own confirmation must reach another DHT node (:func:`_store_elsewhere`), or we do not
        step: hivemind's store also keeps a copy on the node itself and reports success from it,
        so a member whose link just failed would otherwise read its own record, and the others'
        copies replicated to it before the cut, and step alone while the others, who never see
        its record, retry without it (seen in CI as test_partition's fork). What remains is a
        confirmation stored elsewhere that the others fail to find within ``commit_s``.
        ``excused`` members (left out by a reducer for sending garbage) never hold the result and
        are not waited for.
        """
        key = done_key(self._averager.prefix, gathered)
        dht = self._averager.dht
        try:
            stored = dht.run_coroutine(functools.partial(_store_elsewhere, key, self.peer_id, get_dht_time() + DONE_TTL_S),
                                       return_future=True).result(timeout=self.cfg.request_s)
        except Exception as e:
            stored, reason = False, repr(e)
        else:
            reason = "no other DHT node took it"
        if not stored:
            self.one_sided += 1
            raise AveragingFailed(f"round of epoch {epoch}: the result is complete here, but this peer's confirmation reached "
                                  f"no other peer ({reason}); not applied, so it does not step alone")
        deadline, missing, failed = time.monotonic() + self.cfg.commit_s, set(gathered) - {self.peer_id}, set()
        while True:
            try:
                found = dht.get(key, latest=True, return_future=True).result(timeout=self.cfg.request_s)
                entries = found.value if found is not None and isinstance(found.value, dict) else {}
                records = {peer: getattr(entry, "value", None) for peer, entry in entries.items()}
                missing, failed = commit_state(gathered, {**records, self.peer_id: True}, excused)
            except Exception as e:
                log.debug("could not read this round's confirmations: %r", e)
            if failed:  # a member's all-reduce failed (process._aggregate_with_group files it): no need to wait
                self.one_sided += 1
                raise AveragingFailed(f"round of epoch {epoch}: the result is complete here, but {len(failed)} member(s) "
                                      f"failed theirs; not applied, so no member steps alone")
            if not missing:
                return
            if time.monotonic() > deadline:
                self.one_sided += 1
                raise AveragingFailed(f"round of epoch {epoch}: the result is complete here, but {len(missing)} member(s) did not "
                                      f"confirm theirs within commit_s={self.cfg.commit_s:g} s; not applied, so no member steps alone")
            time.sleep(0.1)

    def _call(self, method: str, timeout: float | None = None, **kwargs):
        """Run an async method of the averager in its process and wait (bounded) for its result."""
        future = MPFuture()
        self._averager._outer_pipe.send((method, [], dict(kwargs, future=future)))
        return future.result(timeout=timeout or self.cfg.request_s)

    def download_state(self, peers: list[str], timeout: float):
        """Fetch ``(donor, metadata, tensors)`` from the first of ``peers`` that answers, else raise.

        Peers that declare they serve their state are tried first: a client-mode peer holds the
        same state but cannot be dialed, and asking it would only cost a timeout. The others stay
        last in line, in case a declaration lapsed (it is refreshed every few seconds).
        """
        sharers = self.state_sharers() or set()
        peers = sorted(peers, key=lambda p: p not in sharers)  # stable: the caller's order otherwise
        try:
            result = self._call("_download_state_from", timeout, peers=peers, chunk_timeout=self.cfg.next_chunk_s)
        except Exception as e:
            raise StateDownloadFailed(f"no state from {len(peers)} peer(s) within {timeout:.0f} s: {e!r}") from None
        if result is None:
            raise StateDownloadFailed(f"none of {len(peers)} peer(s) served its state")
        return result

    def shutdown(self) -> None:
        from p2pdiloco.dht import ensure_stopped

        if self._averager.is_alive():
            try:
                self._averager.shutdown()
            except Exception as e:
                log.debug("averager shutdown: %r", e)
        ensure_stopped(self._averager)


async def _store_elsewhere(key: str, subkey: str, expiration_time: float, dht, node) -> bool:
    """Runs in the DHT's process (``DHT.run_coroutine``): store ``key[subkey] = True`` on the nearest
    other nodes, and say whether at least one of them took it (see ``PseudoGradientAverager._commit``).

    Not ``node.store(..., exclude_self=True)``: its result is the answer of whichever replica
    answered *last*, so a node that refuses the record (an outsider's DHT, which cannot check a
    closed run's MAC) makes a store that others took look failed. Each replica is asked here, as
    hivemind's own store does (same record, signed by the run's validator), and counted.
    """
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord

    key_id = DHTID.generate(source=key)
    nearest = await node.find_nearest_nodes([key_id], k_nearest=node.num_replicas, exclude_self=True)
    protocol = node.protocol
    value = protocol.serializer.dumps(True)
    if protocol.record_validator is not None:
        record = DHTRecord(key_id.to_bytes(), protocol.serializer.dumps(subkey), value, expiration_time)
        value = protocol.record_validator.sign_value(record)
    answers = await asyncio.gather(*(protocol.call_store(peer, keys=[key_id], values=[value], expiration_time=[expiration_time],
                                                         subkeys=[subkey]) for peer in nearest.get(key_id, {}).values()),
                                   return_exceptions=True)
    # An answer is None (no response), an exception, or the replica's store_ok: a protobuf
    # repeated field, which is not a list.
    return any(answer is not None and not isinstance(answer, BaseException) and len(answer) > 0 and bool(answer[0])
               for answer in answers)
