"""The two-level round over the wire (docs/scaling.md): the part that runs in the averager process.

:mod:`p2pdiloco.plan` decides everything (who owns which column, who decides which cell, what a
peer applies and carries); this module moves the bytes it names, with hivemind's p2p streams and
no matchmaking. Every peer that read the same ready set builds the same plan, so it knows whom to
send to and whom to wait for without asking anybody.

One message kind per stage, each a stream of :class:`averaging_pb2.AveragingData` whose first
message carries a small header (in ``group_id``: plan, kind, index, weight, members) and whose
``tensor_part`` s are the run's codec bytes, cut in chunks:

- ``column``: a member's column ``c`` of its pseudo-gradient, to its group's owner of ``c``
  (encoded with error feedback, as the butterfly's parts are);
- ``partial``: an owner's group partial for cell ``(c, h)``, to the cell's decider, with the
  weight and the members it includes;
- ``decision``: a decided cell, encoded **once** by its decider, to the column's other owners;
- ``forward``: the same bytes, unchanged, from an owner to the members of its group;
- ``fetch`` (the repair step): "send me cell ``(c, h)`` if you hold it", answered with its bytes
  once the holder's own round has settled the cell (a final answer);
- ``peek``: the same asked of any other peer of the round, answered within one silence with what
  it holds: when a holder we must ask cannot be reached from here (a link down one way), a peer
  that can reach it has the cell, and taking it from there keeps us on the one state.

Nothing a stranger sends is trusted: headers are type-checked, a part must decode to the size
the plan says and hold finite values, and a message larger than the whole pseudo-gradient in
fp32 is refused. Messages may arrive before our own round starts (a faster peer): the
:class:`Mailbox` keeps them, for a few recent plans only.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import time
from typing import Any, AsyncIterator

import torch
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import aiter_with_timeout, anext
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from p2pdiloco import faults, plan as planning, robust
from p2pdiloco.averaging.runner import DECODE_S, ENCODE_S, RECEIVED, SENT
from p2pdiloco.averaging.wire import all_finite, usable_contribution

log = logging.getLogger(__name__)

KINDS = ("column", "partial", "decision", "forward", "fetch", "peek")
CHUNK_BYTES = 1 << 19  # the size of one streamed chunk (hivemind's parts are 512 KB too)
KEPT_PLANS = 8  # rounds whose messages and decisions a peer keeps (late arrivals, repair requests)
PEEKS = 8  # how many other peers a repair peeks at when a holder could not be reached


@dataclasses.dataclass(frozen=True)
class Header:
    """What a message is: the plan it belongs to, its kind, the column (``column``) or cell it
    carries, the sender's weight (tokens) and, for partials and decisions, whose work it holds."""

    plan_id: str
    kind: str
    index: tuple[int, ...]
    weight: float = 0.0
    members: tuple[str, ...] = ()
    flagged: tuple[str, ...] = ()  # members an owner's robust rule flagged (partials, and the decisions that hold them)
    # Senders left out for non-finite or malformed values (by an owner, or the decider): carried
    # in the decision, so every peer that holds it bans the same peers and plans the same rounds.
    refused: tuple[str, ...] = ()

    def dump(self) -> dict:
        return {"plan": self.plan_id, "kind": self.kind, "index": list(self.index), "weight": self.weight,
                "members": list(self.members), "flagged": list(self.flagged), "refused": list(self.refused)}

    @classmethod
    def load(cls, raw: Any) -> "Header":
        """Parse a stranger's header; raises ValueError naming what is wrong."""
        if not isinstance(raw, dict):
            raise ValueError("the header is not a map")
        plan_id, kind, index = raw.get("plan"), raw.get("kind"), raw.get("index")
        weight, members = raw.get("weight", 0.0), raw.get("members", [])
        flagged, refused = raw.get("flagged", []), raw.get("refused", [])
        if not isinstance(plan_id, str) or len(plan_id) > 64:
            raise ValueError("bad plan id")
        if kind not in KINDS:
            raise ValueError(f"unknown kind {str(kind)[:20]!r}")
        if not isinstance(index, (list, tuple)) or not 1 <= len(index) <= 2 or not all(isinstance(i, int) and 0 <= i < 1 << 20 for i in index):
            raise ValueError("bad index")
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError("bad weight")
        for name, peers in (("members", members), ("flagged", flagged), ("refused", refused)):
            if not isinstance(peers, (list, tuple)) or len(peers) > 1 << 16 or not all(isinstance(m, str) and len(m) < 100 for m in peers):
                raise ValueError(f"bad {name}")
        return cls(plan_id, kind, tuple(index), float(weight), tuple(members), tuple(flagged), tuple(refused))


_LATE = object()  # a message slot whose wait has ended: what comes now is not used


class Mailbox:
    """Messages of recent rounds, by plan and ``(kind, index, sender)``; filled by the rpc handler,
    awaited by the round. Only the last :data:`KEPT_PLANS` plans are kept, so a stranger cannot
    fill our memory with messages for rounds that never run.

    A message that comes after our wait for it ended is refused, not stored: its sender must not
    count as delivered a cell we will never use (see :meth:`TwoLevel._tl_withdraw_undelivered`)."""

    def __init__(self):
        self._plans: collections.OrderedDict[str, dict[tuple, asyncio.Future]] = collections.OrderedDict()
        self.activity: dict[str, float] = {}  # plan -> when a chunk last arrived for it
        self.running: set[str] = set()  # plans whose round this peer started (kept as long as their messages)

    def _slots(self, plan_id: str) -> dict[tuple, asyncio.Future]:
        if plan_id not in self._plans:
            self._plans[plan_id] = {}
            while len(self._plans) > KEPT_PLANS:
                old, _ = self._plans.popitem(last=False)
                self.activity.pop(old, None)
                self.running.discard(old)
        return self._plans[plan_id]

    def start(self, plan_id: str) -> None:
        """Our own round of ``plan_id`` began: repair requests for it wait for our verdict."""
        self._slots(plan_id)
        self.running.add(plan_id)

    def slot(self, plan_id: str, key: tuple) -> asyncio.Future:
        slots = self._slots(plan_id)
        if key not in slots:
            slots[key] = asyncio.get_event_loop().create_future()
        return slots[key]

    def put(self, plan_id: str, key: tuple, value: Any) -> bool:
        """Store ``value`` under ``key``; False if the key was taken already (a replay) or its wait
        is over (late)."""
        future = self.slot(plan_id, key)
        if future.done():  # the first message for a key counts: a replay changes nothing
            return False
        future.set_result(value)
        return True

    def get(self, plan_id: str, key: tuple) -> Any | None:
        future = self._plans.get(plan_id, {}).get(key)
        value = future.result() if future is not None and future.done() else None
        return None if value is _LATE else value

    def touch(self, plan_id: str) -> None:
        self.activity[plan_id] = time.monotonic()

    async def take(self, plan_id: str, keys: list[tuple], silence_s: float) -> dict[tuple, Any]:
        """Wait until every key arrived, or until ``silence_s`` passed with no chunk arriving for
        this plan (a dead or late sender); return what arrived."""
        futures = {key: self.slot(plan_id, key) for key in keys}
        self.touch(plan_id)
        while not all(f.done() for f in futures.values()):
            left = self.activity.get(plan_id, 0.0) + silence_s - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait([f for f in futures.values() if not f.done()], timeout=left)
        for future in futures.values():
            if not future.done():
                future.set_result(_LATE)  # from now on, a message for it is refused as late
        return {key: f.result() for key, f in futures.items() if f.result() is not _LATE}


class TwoLevel:
    """The two-level round, mixed into the averager (:class:`~p2pdiloco.averaging.process._Averager`),
    whose p2p, codec, aggregation rule, error-feedback buffer, counters and bans it uses."""

    def _mailbox(self) -> Mailbox:
        if getattr(self, "_tl_mailbox", None) is None:
            self._tl_mailbox = Mailbox()
        return self._tl_mailbox

    # ------------------------------------------------------------------ the wire
    async def rpc_two_level(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                            ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """Receive one message of a two-level round (or answer a repair request)."""
        sender = context.remote_id
        refused = averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
        if sender.to_base58() in self._tl_cut_off():  # tests: a link down between two peers only
            return
        if sender in self._banned or not await self._published_member(sender):  # closed runs: members only
            yield refused
            return
        try:
            first = await asyncio.wait_for(anext(stream), self._tl_silence_s())
            header = Header.load(self.serializer.loads(first.group_id))
        except Exception as e:
            log.debug("two-level message from %s refused: %r", sender, e)
            yield refused
            return
        box = self._mailbox()
        if header.kind in ("fetch", "peek"):
            # Read the asker's end of stream first: answering and closing before it arrives breaks
            # the asker's pipe, and its read then fails although the answer came.
            try:
                async for _ in aiter_with_timeout(stream, self._tl_silence_s()):
                    pass
            except Exception:
                yield refused
                return
            held = _serve(box, header.plan_id, header.index,
                          await self._tl_answer(box, header.plan_id, header.index, final=header.kind == "fetch"))
            if held is None:
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART)  # no header: "not here"
                return
            async for message in self._tl_messages(dataclasses.replace(held[0], kind="decision"), held[1]):
                yield message
            return
        limit = 4 * self._tl_size + (1 << 20)  # nothing legitimate is larger than the fp32 vector
        chunks, received = [first.tensor_part], first.ByteSize()
        try:
            async for message in aiter_with_timeout(stream, self._tl_silence_s()):
                received += message.ByteSize()
                if received > limit:
                    raise ValueError(f"over {limit} bytes")
                chunks.append(message.tensor_part)
                box.touch(header.plan_id)
        except Exception as e:
            log.debug("two-level %s from %s failed: %r", header.kind, sender, e)
            yield refused
            return
        self.traffic[RECEIVED] += received
        stored = box.put(header.plan_id, (header.kind, header.index, sender.to_base58()), (header, combine_from_streaming(chunks)))
        box.touch(header.plan_id)
        # "Too late" (or a replay) is not a delivery: the sender must not count on us holding it.
        yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART if stored else averaging_pb2.CANCELLED)

    async def _tl_answer(self, box: Mailbox, plan_id: str, cell: tuple, final: bool):
        """The cell for a repair request, or None, once our own round has settled the cell (a
        decider once it decided, an owner once its wait for the decision ended, a member once its
        forward or its own repair came).

        ``final`` (a fetch, to a holder): waited for as long as our round may last. A "not here"
        given while the decision was still on its way, as a silence-bounded wait gave under load,
        left the asker without a cell the others held: a second state. A peek (to any peer)
        waits one silence at most: two peers that both lack the cell and peek at each other then
        wait a silence each, not a round. A plan we have not started within a silence is one we
        may never run (we read another ready set): "not here" then; to a peek, at once.
        """
        if not final and plan_id not in box.running:
            return box.get(plan_id, ("held", cell))
        slot = box.slot(plan_id, ("held", cell))
        try:
            return await asyncio.wait_for(asyncio.shield(slot), self._tl_silence_s())
        except asyncio.TimeoutError:
            if not final or plan_id not in box.running:
                return None
        try:
            return await asyncio.wait_for(asyncio.shield(slot), self._tl_deadline_s())
        except asyncio.TimeoutError:
            return None

    async def _tl_messages(self, header: Header, serialized: runtime_pb2.Tensor) -> AsyncIterator[averaging_pb2.AveragingData]:
        metadata = self.serializer.dumps(header.dump())
        for i, chunk in enumerate(split_for_streaming(serialized, CHUNK_BYTES)):
            message = averaging_pb2.AveragingData(tensor_part=chunk, group_id=metadata if i == 0 else b"")
            self.traffic[SENT] += message.ByteSize()
            yield message

    async def _tl_send(self, peer: str, header: Header, serialized: runtime_pb2.Tensor) -> bool:
        """Send one message; whether the receiver took it. A failure is the receiver's (dead, late)."""
        if peer == self._tl_me:
            self._mailbox().put(header.plan_id, (header.kind, header.index, peer), (header, serialized))
            return True
        if peer in self._tl_cut_off():
            return False
        try:
            stub = self.get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)
            replies = await stub.rpc_two_level(self._tl_messages(header, serialized))
            reply = await asyncio.wait_for(anext(replies), self._tl_silence_s())
            return reply.code == averaging_pb2.AVERAGED_PART
        except Exception as e:
            log.debug("two-level %s to %s failed: %r", header.kind, peer, e)
            return False

    async def _tl_fetch(self, peer: str, plan_id: str, cell: planning.Cell, kind: str = "fetch"
                        ) -> tuple[tuple[Header, runtime_pb2.Tensor] | None, bool]:
        """The repair step: ask ``peer`` for a decided cell (``kind`` "fetch", or "peek" for what it
        holds now). Returns the cell (or None) and whether ``peer`` answered at all: a final "not
        here" is an answer, a dead or refusing peer is not."""
        if peer in self._tl_cut_off():
            return None, False
        try:
            stub = self.get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)
            ask = averaging_pb2.AveragingData(group_id=self.serializer.dumps(Header(plan_id, kind, cell).dump()))
            replies = await stub.rpc_two_level(_one(ask))
            chunks, header = [], None
            # The holder answers once its own round settled the cell (bounded by its round's deadline).
            async for message in aiter_with_timeout(replies, self._tl_deadline_s()):
                if header is None:
                    if not message.group_id:
                        return None, message.code == averaging_pb2.AVERAGED_PART  # "not here", or refused
                    header = Header.load(self.serializer.loads(message.group_id))
                self.traffic[RECEIVED] += message.ByteSize()
                chunks.append(message.tensor_part)
            if header is None or header.kind != "decision" or header.index != tuple(cell) or header.plan_id != plan_id:
                return None, False
            return (header, combine_from_streaming(chunks)), True
        except Exception as e:
            log.debug("repair of cell %s from %s failed: %r", cell, peer, e)
            return None, False

    def _tl_usable(self, sender: str, header: Header, serialized: runtime_pb2.Tensor, n: int) -> torch.Tensor | None:
        """A received column or partial as values, or None (and the sender banned) if it does not
        decode, holds other than ``n`` values, non-finite ones or a non-positive weight."""
        try:
            values = self._codec.extract(serialized).reshape(-1)
        except ValueError as e:
            self._ban(PeerID.from_base58(sender), f"sent a malformed {header.kind} ({e})")
            return None
        if values.numel() != n or not usable_contribution(values, header.weight):
            self._ban(PeerID.from_base58(sender), f"sent a non-finite or wrong-sized {header.kind}")
            return None
        return values

    def _tl_cut_off(self) -> frozenset:
        """Peers this round's ``link:cut`` fault (tests only) cuts us off from; empty otherwise."""
        return getattr(self, "_tl_cut", frozenset())

    def _tl_silence_s(self) -> float:
        return float(getattr(self, "_tl_silence", 10.0))

    def _tl_deadline_s(self) -> float:
        """How long a repair request may wait for its answer: a round's deadline (a few silences
        before our first round)."""
        return float(getattr(self, "_tl_deadline", 0.0) or 4 * self._tl_silence_s())

    # ------------------------------------------------------------------ the round
    async def _two_level_round(self, groups: list[list[str]], clients: list[str], plan_id: str, epoch: int, digest: str,
                               weight: float, silence_s: float, deadline_s: float, future, quorum: float = 0.5) -> None:
        """Run this peer's part of one round; the assembled average (undecided cells zero) goes
        into the shared buffer, and ``future`` gets ``{"decisions": {cell: members}}`` of the
        decisions held. Past ``deadline_s`` the round is abandoned and the buffer left alone.

        A round this peer will not apply (abandoned, below ``quorum``, a doubtful cell) withdraws
        every cell it holds: a peer that fetched them now could step with a set of cells we do
        not step with, while we catch up with the swarm instead."""
        plan = planning.Plan(epoch=epoch, digest=digest, plan_id=plan_id, groups=tuple(tuple(g) for g in groups),
                             clients=frozenset(clients))
        self._tl_sends: list[asyncio.Task] = []
        self._tl_deliveries: dict[planning.Cell, list[asyncio.Task]] = {}  # our decided cell -> its sends
        self._tl_deadline = deadline_s
        self._tl_started = time.monotonic()
        self._mailbox().start(plan_id)
        try:
            answer = await asyncio.wait_for(self._tl_round(plan, weight, silence_s, quorum), deadline_s)
            self._tl_count_codec()  # before the host reads the counters
            future.set_result(answer)
        except Exception as e:
            log.debug("two-level round failed: %r", e, exc_info=True)
            self._tl_withdraw_all(plan)
            if not future.done():
                future.set_exception(e)
        finally:
            for task in self._tl_sends:
                task.cancel()
            self._tl_settle(plan, plan.cells())  # an abandoned round holds nothing more
            self._tl_count_codec()

    def _tl_count_codec(self) -> None:
        """The codec's cumulative encode and decode seconds, into the counters the host reads."""
        self.traffic[ENCODE_S], self.traffic[DECODE_S] = self._codec.encode_s, self._codec.decode_s

    def _tl_settle(self, plan: planning.Plan, cells) -> None:
        """Our verdict on ``cells`` is in: those not held by now are "not here" to every repair
        request, waiting or to come (:meth:`rpc_two_level`). A cell held already stays held."""
        box = self._mailbox()
        for cell in cells:
            box.put(plan.plan_id, ("held", tuple(cell)), None)

    def _tl_post(self, peer: str, header: Header, serialized: runtime_pb2.Tensor) -> asyncio.Task:
        """Send in the background: the round goes on to its next wait, which is what bounds it."""
        task = asyncio.create_task(self._tl_send(peer, header, serialized))
        self._tl_sends.append(task)
        return task

    def _tl_withdraw_all(self, plan: planning.Plan) -> None:
        """Every cell of ``plan`` is "not here" from now on (we do not step with this round)."""
        box = self._mailbox()
        log.debug("two-level round of epoch %d not stepped with: its cells withdrawn", plan.epoch)
        for cell in plan.cells():
            box.put(plan.plan_id, ("withdrawn", tuple(cell)), True)

    async def _tl_withdraw_undelivered(self, plan: planning.Plan, decisions: dict, wait_s: float) -> None:
        """Drop the cell we decided if it reached no other peer: no send was taken and no repair
        request was answered with it. Then nobody else holds it, and stepping with it would make
        our state alone in the swarm, as a peer cut off in mid-round did in the partition test
        (it decided its cell, could not deliver it, then fetched the others' cells once the link
        healed). Withdrawn, the cell is "not here" to every later request, so it is undecided
        everywhere and each peer carries its share of it. Sends still in flight get ``wait_s``.
        """
        box, pid = self._mailbox(), plan.plan_id
        for cell, tasks in self._tl_deliveries.items():
            if cell not in decisions or not tasks:
                continue  # nobody to push to (clients pull): nothing to judge from
            done, pending = await asyncio.wait(tasks, timeout=max(0.0, wait_s))
            if any(t.result() for t in done if not t.cancelled()) or box.get(pid, ("served", cell)):
                continue
            for task in pending:
                task.cancel()  # a stream cut off before its end is not taken
            box.put(pid, ("withdrawn", cell), True)  # with no await since the check: no request served between
            del decisions[cell]
            log.info("two-level cell %s of epoch %d reached no other peer: withdrawn, so no peer steps with it alone",
                     cell, plan.epoch)

    async def _tl_drain(self, silence_s: float) -> None:
        """Give our last sends up to ``silence_s`` to finish (receivers may still be reading)."""
        pending = [t for t in self._tl_sends if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=silence_s)

    async def _tl_round(self, plan: planning.Plan, weight: float, silence_s: float, quorum: float = 0.5) -> dict:
        self._tl_silence, me = silence_s, self.peer_id.to_base58()
        self._tl_me = me
        with self.get_tensors() as (buffer,):
            x = buffer.detach().clone()
        size = self._tl_size = x.numel()
        box, codec, pid = self._mailbox(), self._codec, plan.plan_id
        g, own = plan.group_of(me), plan.column_of(me)
        members = plan.groups[g]
        self._tl_cut = frozenset([m for m in members if m != me][:1]) if faults.reached("link") == "cut" else frozenset()
        cells = plan.cell_spans(size)
        if self.residual is not None:
            self.residual.zero_()
        loop = asyncio.get_event_loop()

        # Stage 1: our columns to their owners (error feedback on what quantizing dropped).
        def encode_column(c: int) -> runtime_pb2.Tensor:
            start, stop = plan.column_span(c, size)
            serialized = codec.compress(x[start:stop])
            if self.residual is not None:
                self.residual[start:stop] = x[start:stop] - codec.extract(serialized)
            return serialized

        for c in range(plan.columns):
            if c != own:
                serialized = await loop.run_in_executor(None, encode_column, c)
                self._tl_post(plan.owner(g, c), Header(pid, "column", (c,), weight), serialized)
        faults.reached("allreduce")  # tests: our columns are on their way, the round is under way
        decisions: dict[planning.Cell, tuple[Header, runtime_pb2.Tensor]] = {}
        if own is not None:
            decisions.update(await self._tl_own_column(plan, me, g, own, x, weight, silence_s))
        # Stage 3 (members): the cells of the other columns, forwarded by their owners in our group.
        # A peer that cannot be dialed fetches them instead, from the same owners (the repair below).
        if me not in plan.clients:
            wanted = [(c, h) for c in range(plan.columns) if c != own for h in range(len(plan.groups))]
            arrived = await box.take(pid, [("forward", cell, plan.owner(g, cell[0])) for cell in wanted], silence_s)
            for (_, cell, _), (header, serialized) in arrived.items():
                decisions[cell] = (header, serialized)
                box.put(pid, ("held", cell), (header, serialized))  # a peek may ask us for it from now on

        unsure = []  # cells left zero although a holder we could not ask may hold them
        doubtful = []  # ... and some of the peers we peeked at did not answer either

        async def repair(cell):
            """Ask the holder that should have sent it (our group's owner of its column), then every
            other holder at once; the first that has it answers."""
            first, *rest = _holders(plan, cell, me, g)
            fetched, answered = await self._tl_fetch(first, pid, cell)
            if fetched is None and rest:
                asks = [asyncio.create_task(self._tl_fetch(holder, pid, cell)) for holder in rest]
                try:
                    for answer in asyncio.as_completed(asks):
                        fetched, sure = await answer
                        answered = answered and sure
                        if fetched is not None:
                            break
                finally:
                    for ask in asks:
                        ask.cancel()
            if fetched is None and not answered:
                # A holder we could not reach may hold it, and then so do the peers it reached:
                # peek at some (our group first, then the next groups').
                asked = {me, *_holders(plan, cell, me, g)}
                others = [p for h in range(len(plan.groups)) for p in plan.groups[(g + h) % len(plan.groups)]
                          if p not in asked and p not in plan.clients][:PEEKS]
                peeks = [asyncio.create_task(self._tl_fetch(p, pid, cell, "peek")) for p in others]
                reached_all = bool(peeks)
                try:
                    # A peer answers within a silence (see _tl_answer); a dead peer's dial may hang.
                    for answer in asyncio.as_completed(peeks, timeout=2 * silence_s + 1):
                        fetched, sure = await answer
                        reached_all = reached_all and sure
                        if fetched is not None:
                            break
                except asyncio.TimeoutError:
                    reached_all = False
                finally:
                    for peek in peeks:
                        peek.cancel()
                log.debug("cell %s: holder unreachable; peeked at %d peer(s): %s", cell, len(peeks),
                          "got it" if fetched is not None else "all answered without it" if reached_all else "not all answered")
                if fetched is None and not reached_all:
                    # We reach neither the holder nor all of the others: we are likelier the peer
                    # that is cut off than they are. Stepping without a cell they may all hold
                    # would leave us alone on a second state (seen right after a partition healed).
                    doubtful.append(cell)
            if fetched is not None:
                decisions[cell] = fetched
            elif not answered:
                unsure.append(cell)

        # The repairs end in time to assemble, judge our own cell and drain before the deadline:
        # a round abandoned at the deadline while a partner's completed was a second state in CI
        # (the partner fetched our cells once a cut link healed; we had given up on its cell).
        end = self._tl_started + self._tl_deadline
        left = lambda: end - time.monotonic()  # noqa: E731
        margin = max(1.0, 0.15 * self._tl_deadline)  # to judge our cell, assemble and drain
        repairing = {cell: asyncio.create_task(repair(cell)) for cell in plan.cells() if cell not in decisions}
        if repairing:
            _, late = await asyncio.wait(repairing.values(), timeout=max(0.0, left() - margin))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            # Not knowing whether a holder we could not finish asking has the cell, step not: the
            # swarm's state can be downloaded, a second state cannot be undone (the soak's forks).
            doubtful += [cell for cell, task in repairing.items() if task in late and cell not in decisions]
        if left() < margin and not doubtful:
            # Our round ran past the point where our partners stop repairing (we were frozen or
            # starved): they may have given up on this plan and averaged again without us, and
            # the cells we hold may be ones they did not step with (a peer SIGSTOPped in CI
            # resumed, found their forwards in its buffers and stepped alone). Step not.
            doubtful.append(None)
        await self._tl_withdraw_undelivered(plan, decisions, min(silence_s, left() / 2))
        # The assembled average: every held decision decoded from the bytes its decider sent.
        average = torch.zeros(size)
        held, flagged, refused = {}, set(), set()
        for cell, (header, serialized) in decisions.items():
            start, stop = cells[cell]
            values = codec.extract(serialized).reshape(-1)
            if values.numel() != stop - start or not all_finite(values):
                continue  # a malformed decision is an undecided cell (its sender is the one to blame)
            average[start:stop] = values
            held[cell] = list(header.members)
            flagged.update(header.flagged)
            refused.update(header.refused)
            box.put(pid, ("held", cell), (header, serialized))
        with self.get_tensors() as (buffer,):
            buffer.copy_(average)
        if doubtful or sum(cells[c][1] - cells[c][0] for c in held) <= quorum * size:
            self._tl_withdraw_all(plan)  # we step not: nobody may step with our cells of this round
        await self._tl_drain(min(silence_s, max(0.0, left() - 0.5)))  # the members we forward to may still be reading
        return {"decisions": held, "flagged": sorted(flagged), "refused": sorted(refused), "unsure": len(unsure),
                "doubtful": len(doubtful)}

    async def _tl_own_column(self, plan: planning.Plan, me: str, g: int, own: int, x: torch.Tensor, weight: float,
                             silence_s: float) -> dict:
        """As the owner of column ``own`` in group ``g``: reduce the group's column (stage 1), send its
        cells to their deciders and decide our own cell (stage 2), then forward the column's
        decisions to our group (stage 3). Returns the decisions of our column that we hold."""
        box, codec, pid, size = self._mailbox(), self._codec, plan.plan_id, x.numel()
        loop = asyncio.get_event_loop()
        start, stop = plan.column_span(own, size)
        others = [m for m in plan.groups[g] if m != me]
        got = await box.take(pid, [("column", (own,), m) for m in others], silence_s)
        parts, weights, included, refused = [x[start:stop]], [weight], [me], []
        for (_, _, sender), (header, serialized) in got.items():
            part = self._tl_usable(sender, header, serialized, stop - start)
            if part is None:
                refused.append(sender)
                continue
            parts.append(part)
            weights.append(header.weight)
            included.append(sender)
        partial, flagged = await loop.run_in_executor(None, robust.aggregate_with, parts, weights, self._aggregation)
        flagged = tuple(sorted(included[i] for i in flagged if included[i] != me))
        group_weight = float(sum(weights))
        faults.reached("partials")
        # Stage 2: each cell of our partial to its decider (ourselves for our own group's cell).
        for h in range(len(plan.groups)):
            cell = (own, h)
            a, b = plan.cell_span(cell, size)
            serialized = await loop.run_in_executor(None, codec.compress, partial[a - start:b - start])
            self._tl_post(plan.decider(cell), Header(pid, "partial", cell, group_weight, tuple(included), flagged,
                                                     tuple(sorted(refused))), serialized)
        mine = (own, g)
        owners = [plan.owner(h, own) for h in range(len(plan.groups))]
        partials = await box.take(pid, [("partial", mine, o) for o in owners], silence_s)
        held = {}
        if partials:
            total, acc, contributors, flags, refusals = 0.0, None, set(), set(), set()
            a, b = plan.cell_span(mine, size)
            for (_, _, sender), (header, serialized) in partials.items():
                values = self._tl_usable(sender, header, serialized, b - a)
                if values is None:
                    refusals.add(sender)
                    continue
                acc = values * header.weight if acc is None else acc.add_(values, alpha=header.weight)
                total += header.weight
                contributors.update(header.members)
                flags.update(p for p in header.flagged if p in header.members)  # an owner flags only its own group
                # ... and refuses only its own group's members (never itself)
                group = plan.groups[plan.group_of(sender)]
                refusals.update(p for p in header.refused if p in group and p != sender)
            if acc is not None:
                serialized = await loop.run_in_executor(None, codec.compress, acc / total)  # encoded once: the same bytes for all
                decision = Header(pid, "decision", mine, total, tuple(sorted(contributors)), tuple(sorted(flags)),
                                  tuple(sorted(refusals)))
                held[mine] = (decision, serialized)
                box.put(pid, ("held", mine), held[mine])
                self._tl_deliveries[mine] = [self._tl_post(o, decision, serialized) for o in owners if o != me]
        # The other groups' decisions of our column, then all of them to our group, unchanged.
        others_cells = [(own, h) for h in range(len(plan.groups)) if h != g]
        got = await box.take(pid, [("decision", cell, plan.decider(cell)) for cell in others_cells], silence_s)
        for (_, cell, _), value in got.items():
            held[cell] = value
            box.put(pid, ("held", cell), value)
        self._tl_settle(plan, [(own, h) for h in range(len(plan.groups))])  # the others are not coming to us
        for cell, (header, serialized) in held.items():
            forward = dataclasses.replace(header, kind="forward")
            for m in plan.groups[g]:
                if m != me and m not in plan.clients:  # clients fetch theirs
                    task = self._tl_post(m, forward, serialized)
                    if cell == mine:
                        self._tl_deliveries[mine].append(task)
        return held


def _holders(plan: planning.Plan, cell: planning.Cell, me: str, group: int) -> list[str]:
    """Who may hold a decided cell, in the order a repair asks them: our ``group``'s owner of its
    column (who should have forwarded it), its decider, then the column's other owners (each got
    it in stage 2)."""
    c, _ = cell
    seen, order = {me}, []
    for p in [plan.owner(group, c), plan.decider(cell)] + [plan.owner(h, c) for h in range(len(plan.groups))]:
        if p not in seen:
            seen.add(p)
            order.append(p)
    return order


def _serve(box: Mailbox, plan_id: str, cell: tuple, held):
    """What a repair request gets: ``held``, unless we withdrew that cell; a cell handed out is
    marked served, so we do not withdraw it afterwards. No await between the check and the mark."""
    if held is None or box.get(plan_id, ("withdrawn", cell)):
        return None
    box.put(plan_id, ("served", cell), True)
    return held


async def _one(message):
    yield message
