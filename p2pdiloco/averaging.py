"""The consistent all-reduce of pseudo-gradients over hivemind.

hivemind's stock butterfly all-reduce returns to each peer ``avg - decompress(x_i)`` and lets the
peer add it to its own uncompressed ``x_i``: every member keeps its own quantization error and
float re-association, so members of one group end a round with slightly different "averages"
(2–4 % apart with 8-bit codecs). An outer Nesterov step on different inputs gives different
outer states, which is a fork of the run.

:class:`ConsistentAllReduceRunner` changes the protocol in one place: the reducer of a slice
computes the weighted mean in fp32, serializes it **once** with the run's codec, and sends those
same bytes to every member (itself included, through the same decode). Every member therefore
decodes byte-identical averages. The runner is also all-or-nothing: if any reducer's slice is
missing (peer died, timed out, sent garbage), the round raises instead of leaving that slice at
local values, so a partial result is never applied.

:class:`PseudoGradientAverager` owns one flat fp32 buffer (one buffer so a failure can never
leave some tensors averaged and others not), keys matchmaking by the epoch (only peers at the same
epoch can group), puts a hard deadline on every round and measures the bytes actually sent and
received. It also serves the outer state to newcomers under the caller's lock and downloads it
from a chosen list of peers.

Every peer of a swarm must run this runner: the meaning of the ``AVERAGED_PART`` message differs
from stock hivemind, and the run's fingerprint (part of the averaging prefix) keeps peers of
different versions or configs apart. hivemind is pinned exactly because this relies on private
attributes of ``AllReduceRunner`` and ``TensorPartContainer`` in 1.1.12.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import time
from typing import Any, AsyncIterator, Callable, Sequence

import torch
from hivemind import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import CompressionBase, CompressionInfo, NoCompression, deserialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MPFuture, get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, attach_event_on_finished
from hivemind.utils.streaming import combine_from_streaming

from p2pdiloco import faults, robust
from p2pdiloco.auth import TOKEN_BYTES, RunSecret
from p2pdiloco.codecs import Codec, make_codec
from p2pdiloco.config import AggregationConfig, AveragingConfig
from p2pdiloco.errors import AveragingFailed, StateDownloadFailed

log = logging.getLogger(__name__)

SENT, RECEIVED, ENCODE_S, DECODE_S = range(4)  # the shared counters of an averager
MAX_GATHER_BYTES = 4096  # one member's matchmaking metadata; ours is about 200 bytes
MEMBER_TTL_S = 6 * 3600.0  # a membership proof record's lifetime; republished every round


def decode_gather(raw: object, serializer) -> dict:
    """One member's matchmaking metadata, as it arrives from the network, checked and decoded.

    hivemind sends ``[bandwidth, mode, user bytes]`` (msgpack) and the user part is p2pdiloco's
    ``gather`` dict: ``epoch`` and ``state_hash`` (which state the member averages), ``member``
    (its membership proof in a closed run) and free keys. Raises ValueError for anything else, so
    a malformed entry refuses the join request or the group instead of crashing matchmaking.
    """
    if not isinstance(raw, bytes) or len(raw) > MAX_GATHER_BYTES:
        raise ValueError("metadata missing or too large")
    try:
        outer = serializer.loads(raw)
        if not (isinstance(outer, (list, tuple)) and len(outer) == 3):
            raise ValueError("not [bandwidth, mode, data]")
        bandwidth, mode, user_bytes = outer
        if bandwidth is not None and (isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float))
                                      or not 0 <= bandwidth < float("inf")):
            raise ValueError("bad bandwidth")  # None: not measured (hivemind's default)
        if isinstance(mode, bool) or mode not in {m.value for m in AveragingMode}:
            raise ValueError("bad averaging mode")
        if not isinstance(user_bytes, bytes):
            raise ValueError("bad data")
        user = serializer.loads(user_bytes)
    except ValueError:
        raise
    except Exception as e:  # msgpack's own errors (ExtraData, FormatError, ...) and type confusion
        raise ValueError(f"undecodable metadata ({type(e).__name__})") from None
    if not isinstance(user, dict) or not all(isinstance(k, str) for k in user):
        raise ValueError("data is not a dict of str keys")
    epoch, state_hash, member = user.get("epoch"), user.get("state_hash"), user.get("member")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < 2**62:
        raise ValueError("bad epoch")
    if not isinstance(state_hash, str) or len(state_hash) > 64:
        raise ValueError("bad state hash")
    if member is not None and not (isinstance(member, bytes) and len(member) == TOKEN_BYTES):
        raise ValueError("bad membership proof")
    return user


class _SenderCodec(CompressionBase):
    """The run's codec as the tensor-part container uses it for *our own* parts on their way to
    reducers: with error feedback it also records, at each part's place in the flat buffer, what
    quantization dropped (``part - decode(encode(part))``), for the host to add to its next
    pseudo-gradient."""

    def __init__(self, codec: Codec, residual: torch.Tensor | None):
        self.codec, self.residual = codec, residual
        self.compression_type = codec.compression_type

    def compress(self, tensor, info, allow_inplace=False):
        serialized = self.codec.compress(tensor, info)
        if self.residual is not None:
            started = time.perf_counter()
            offset = info.part_index * info.part_size  # one flat tensor: parts are consecutive slices
            dropped = tensor.reshape(-1) - self.codec.decode(serialized.buffer, tensor.numel())
            self.residual[offset : offset + tensor.numel()] = dropped
            self.codec.encode_s += time.perf_counter() - started
        if faults.reached("part") == "truncate":  # tests: a well-formed part of the wrong shape
            serialized = self.codec.compress(tensor.reshape(-1)[:-1], info)
        return serialized

    def extract(self, serialized):
        return self.codec.extract(serialized)

    def estimate_compression_ratio(self, info):
        return self.codec.estimate_compression_ratio(info)


class RobustPartReducer(TensorPartReducer):
    """hivemind's part reducer with :func:`p2pdiloco.robust.aggregate` in place of its running mean.

    hivemind sums each part as it arrives; a robust rule needs all members' values at once, so
    the parts are kept until the last member's arrives, then aggregated. ``flagged`` holds the
    sender indices the rule flagged on at least half of the parts aggregated so far.
    """

    def __init__(self, part_shapes, num_senders: int, aggregation: AggregationConfig):
        self.aggregation = aggregation
        self.flag_counts = [0] * num_senders
        self.parts_done = 0
        self._parts: dict[int, dict[int, tuple[torch.Tensor, float]]] = {}  # part index -> sender -> (part, weight)
        super().__init__(part_shapes, num_senders)

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0):
        if 0 <= part_index < self.num_parts:
            self._parts.setdefault(part_index, {})[sender_index] = (tensor_part, weight)
        return await super().accumulate_part(sender_index, part_index, tensor_part, weight=weight)

    def check_current_part_finished(self):
        if self.current_part_accumulated_from == self.num_current_senders:
            collected = self._parts.pop(self.current_part_index, {})
            senders = sorted(s for s in collected if self.current_part_index < self.sender_failed_after[s])
            if senders:
                a = self.aggregation
                result, flagged = robust.aggregate(
                    [collected[s][0] for s in senders], [collected[s][1] for s in senders], a.method,
                    clip_ratio=a.clip_ratio, trim=a.trim, clip_iters=a.clip_iters, max_weight_ratio=a.max_weight_ratio,
                    flag_ratio=a.flag_ratio,
                )
                self.parts_done += 1
                for i in flagged:
                    self.flag_counts[senders[i]] += 1
                self.accumulator.copy_(result)  # the parent divides by the denominator: make it 1
                self.denominator = 1.0
        super().check_current_part_finished()

    @property
    def flagged(self) -> set[int]:
        return {s for s, count in enumerate(self.flag_counts) if count and 2 * count >= self.parts_done}


def parse_reducer_note(field: bytes, members: Sequence[PeerID], me: PeerID) -> tuple[list[PeerID], list[PeerID]]:
    """The note a reducer sends with each average: ``EXCLUDED|FLAGGED``, comma-separated base58 ids
    of the members it left out (non-finite values) and those its robust rule flagged.

    It comes from another peer: only ids of this group's members other than ``me`` count, and a
    malformed note counts as empty (it can never fail the round or name outsiders).
    """
    def ids(text: str) -> list[PeerID]:
        found = []
        for item in text.split(",")[: len(members)]:
            try:
                peer = PeerID.from_base58(item) if item else None
            except Exception:
                return []
            if peer is not None and peer in members and peer != me and peer not in found:
                found.append(peer)
        return found

    if not isinstance(field, bytes) or len(field) > 64 * (2 * len(members) + 1):
        return [], []
    try:
        excluded, _, flagged = field.decode("ascii").partition("|")
    except UnicodeDecodeError:
        return [], []
    return ids(excluded), ids(flagged)


class ConsistentAllReduceRunner(AllReduceRunner):
    """Butterfly all-reduce whose reducers send the same serialized average to every member.

    ``traffic`` is a shared-memory float64 tensor indexed by ``SENT``/``RECEIVED`` that this
    runner (in the averager process) adds to; the host process reads it after the round. Every
    part is encoded and decoded with the run's :class:`~p2pdiloco.codecs.Codec`, whose ``extract``
    validates tag, shape and length before decoding.
    """

    def __init__(self, *, traffic: torch.Tensor, offender: Callable[[PeerID, str], None], aggregation: AggregationConfig, **kwargs):
        super().__init__(**kwargs)
        self.traffic, self.offender = traffic, offender
        self.excluded: set[PeerID] = set()  # senders this reducer left out for non-finite values
        self.flags_of: dict[PeerID, list[PeerID]] = {}  # reducer -> whom its latest note flagged
        if aggregation.method != "mean":  # no part has arrived yet: the reducer can still be swapped
            stock = self.tensor_part_reducer
            stock.finished.set()  # never used: keeps its finalizer from warning about missing parts
            self.tensor_part_reducer = RobustPartReducer(stock.part_shapes, stock.num_senders, aggregation)
        self._fault_point_passed = False
        container = self.tensor_part_container
        container.return_deltas = False  # outputs are averages, and a failed slice keeps local values...
        self.codec: Codec = container.compression.codec
        me = self.ordered_peer_ids.index(self.peer_id)
        self._part_infos = [info for _, info in container._input_parts_by_peer[me]]
        self._serialized_averages: dict[int, Any] = {}

    def flagged(self) -> set[PeerID]:
        """Members a robust rule flagged in this round (on at least half of some reducer's parts): by
        our reducer, or by others (their last notes)."""
        reducer = self.tensor_part_reducer
        ours = {self.sender_peer_ids[i] for i in getattr(reducer, "flagged", ())}
        theirs = {p for flagged in self.flags_of.values() for p in flagged}
        return (ours | theirs) - {self.peer_id}

    def failed_values(self) -> int:
        return self.tensor_part_container.failed_size  # ...which is why any failure fails the round

    def _serialize_average(self, part_index: int, averaged: torch.Tensor):
        cached = self._serialized_averages.get(part_index)
        if cached is None:
            cached = self.codec.compress(averaged, self._part_infos[part_index])
            self._serialized_averages[part_index] = cached
        return cached

    async def _communicate_with_peer(self, peer_id: PeerID):
        peer_index = self.ordered_peer_ids.index(peer_id)
        if peer_id == self.peer_id:
            # Our own slice goes through the very same encode/decode as what we send to others.
            sender_index = self.sender_peer_ids.index(peer_id)
            loop = asyncio.get_event_loop()
            for part_index, part in enumerate(self.parts_for_local_averaging):
                averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part, weight=self.weight)
                serialized = await loop.run_in_executor(None, self._serialize_average, part_index, averaged)
                self.tensor_part_container.register_processed_part(peer_index, part_index, self.codec.extract(serialized))
            return
        try:
            done_sending = asyncio.Event()
            inputs = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()

            def decode(msg: averaging_pb2.AveragingData):
                if msg.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(msg.code)}")
                return self.codec.extract(msg.tensor_part), msg.ByteSize(), msg.peer_id

            part_index = 0
            expected = self.tensor_part_container.num_parts_by_peer[peer_index]
            async for averaged, size, excluded in amap_in_executor(
                decode, aiter_with_timeout(stream, self.reducer_timeout), max_prefetch=self.tensor_part_container.prefetch
            ):
                if part_index >= expected or averaged.shape != self._expected_shape(peer_index, part_index):
                    self.offender(peer_id, "sent an average of the wrong size")
                    raise AllreduceException(f"{peer_id} sent a part of the wrong size")
                if not torch.isfinite(averaged).all():
                    self.offender(peer_id, "sent a non-finite average")
                    raise AllreduceException(f"{peer_id} sent a non-finite average")
                self.traffic[RECEIVED] += size
                left_out, flagged = parse_reducer_note(excluded, self.sender_peer_ids, self.peer_id)
                for offender in left_out:
                    self.offender(offender, f"was left out by {peer_id} for sending non-finite values")
                self.flags_of[peer_id] = flagged  # the last note sums up all of that reducer's parts
                self.tensor_part_container.register_processed_part(peer_index, part_index, averaged)
                part_index += 1
            if part_index != expected:
                raise AllreduceException(f"{peer_id} sent {part_index} of {expected} averaged parts")
        except BaseException as e:
            if isinstance(e, Exception):
                log.debug("all-reduce with %s failed: %r", peer_id, e)
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    def _expected_shape(self, peer_index: int, part_index: int) -> torch.Size:
        return self.tensor_part_container._input_parts_by_peer[peer_index][part_index][0].shape

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super()._generate_input_for_peer(peer_index):
            self.traffic[SENT] += message.ByteSize()
            yield message
            if not self._fault_point_passed:  # once per round: our first part is on its way
                self._fault_point_passed = True
                faults.reached("allreduce")

    async def _accumulate_parts_streaming(self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int):
        part_index = 0
        expected_shapes = self.tensor_part_reducer.part_shapes
        loop = asyncio.get_event_loop()

        def decode(msg: averaging_pb2.AveragingData):
            return self.codec.extract(msg.tensor_part), msg.weight, msg.ByteSize()

        try:
            async for part, weight, size in amap_in_executor(decode, stream, max_prefetch=self.tensor_part_container.prefetch):
                self.traffic[RECEIVED] += size
                if part_index >= len(expected_shapes) or part.shape != expected_shapes[part_index]:
                    self.excluded.add(self.sender_peer_ids[sender_index])
                    self.offender(self.sender_peer_ids[sender_index], "sent a part of the wrong size")
                    raise AllreduceException(f"sender {sender_index} sent a part of the wrong size")
                if not (math.isfinite(weight) and weight > 0 and torch.isfinite(part).all()):
                    self.excluded.add(self.sender_peer_ids[sender_index])
                    self.offender(self.sender_peer_ids[sender_index], "sent a non-finite pseudo-gradient or weight")
                    raise AllreduceException(f"sender {sender_index} sent a non-finite part or weight")
                try:
                    averaged = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part, weight=weight)
                except BannedException:
                    break
                serialized = await loop.run_in_executor(None, self._serialize_average, part_index, averaged)
                reply = averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized, peer_id=self._note())
                self.traffic[SENT] += reply.ByteSize()
                part_index += 1
                yield reply
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


    def _note(self) -> bytes:
        """The otherwise unused peer_id field of each reply tells every member whom this reducer
        left out (so all of them exclude the offender from later groups, not only this reducer)
        and whom its robust rule flagged so far (for the members' ban decisions)."""
        flagged = {self.sender_peer_ids[i] for i in getattr(self.tensor_part_reducer, "flagged", ())}
        return "|".join(",".join(sorted(p.to_base58() for p in group)) for group in (self.excluded, flagged)).encode()


def group_bits(epoch: int, state_hash: str) -> str:
    """16 matchmaking bits from the epoch and the state digest: peers meet only their own state."""
    digest = hashlib.sha256(f"{epoch}:{state_hash}".encode()).digest()
    return format(int.from_bytes(digest[:2], "big"), "016b")


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


class _Averager(DecentralizedAverager):
    """hivemind's averager with the consistent runner, shared counters, an error-feedback buffer
    and pluggable state."""

    _rpc_handlers = None  # hivemind caches the rpc_* handlers per class: collect ours, not the parent's

    def __init__(self, tensors, *args, codec: Codec, error_feedback: bool, aggregation: AggregationConfig,
                 secret: RunSecret | None, state_fn: Callable[[], tuple[dict, Sequence[torch.Tensor]]], **kwargs):
        self.traffic = torch.zeros(4, dtype=torch.float64).share_memory_()
        size = sum(t.numel() for t in tensors)
        self.residual = torch.zeros(size, dtype=torch.float32).share_memory_() if error_feedback else None
        self._codec = codec
        self._state_fn = state_fn
        self._banned: set[PeerID] = set()  # lives in the averager process, where rounds run
        self._aggregation = aggregation
        self._secret = secret  # closed run: only peers proving membership (see p2pdiloco.auth)
        self._members: set[PeerID] = set()  # proofs already checked (they never expire)
        self._refused_downloads: set[PeerID] = set()  # logged once each
        self._request_s = float(kwargs.get("request_timeout") or 3.0)  # bounds our own DHT reads
        self._last_flagged: list[str] = []  # members flagged in the last round, for the host to take
        super().__init__(tensors, *args, compression=codec, **kwargs)

    def _ban(self, peer_id: PeerID, reason: str) -> None:
        """Refuse ``peer_id`` in every later group of this run (called by the runner).

        A p2pdiloco peer checks its own pseudo-gradient before sending it, so non-finite values on
        the wire come from a broken or hostile peer. Its current round fails (its slice of the
        average is unusable); hivemind retries the round at once, and the retry forms a group
        without it, so the honest peers still average this epoch.
        """
        if peer_id not in self._banned:
            log.warning("peer %s %s: excluded from this peer's groups for the rest of the run", peer_id, reason)
            self._banned.add(peer_id)
        matchmaking = self._matchmaking  # as a leader, rpc_join_group refuses banned followers
        if getattr(matchmaking, "_p2pdiloco_bans", False):
            return
        join = matchmaking._request_join_group

        async def request_join_group(leader):  # as a follower: never follow a banned leader
            return None if leader in self._banned else await join(leader)

        matchmaking._request_join_group = request_join_group
        matchmaking._p2pdiloco_bans = True

    def _is_member(self, peer_id: PeerID, token: object) -> bool:
        if self._secret is None or peer_id in self._members:
            return True
        if self._secret.verify(peer_id.to_bytes(), token):
            self._members.add(peer_id)
            return True
        return False

    def _refuse_outsider(self, peer_id: PeerID, where: str) -> None:
        self._ban(peer_id, f"holds no valid membership proof of this closed run ({where}); refused before any tensor was exchanged")

    async def _published_member(self, peer_id: PeerID) -> bool:
        """Whether ``peer_id`` published a valid membership proof in the DHT (closed runs; for
        state downloads, which carry no metadata of their own)."""
        if self._secret is None or peer_id in self._members:
            return True
        try:
            found = await asyncio.wait_for(
                self.dht.get(f"{self.prefix}.members", latest=True, return_future=True), timeout=self._request_s
            )
            entry = found.value.get(peer_id.to_base58()) if found is not None and isinstance(found.value, dict) else None
        except Exception as e:
            log.debug("could not read the membership proofs: %r", e)
            return False
        return self._is_member(peer_id, getattr(entry, "value", None))

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        """As a leader: refuse banned peers, malformed metadata and (closed runs) non-members at the door."""
        peer = context.remote_id
        refusal = averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
        if peer in self._banned:
            yield refusal
            return
        try:
            user = decode_gather(request.gather, self.serializer)
        except ValueError as e:
            self._ban(peer, f"asked to join with malformed metadata ({e})")
            yield refusal
            return
        if not self._is_member(peer, user.get("member")):
            self._refuse_outsider(peer, "join request")
            yield refusal
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def _aggregate_with_group(self, group_info, min_vector_size, **kwargs):
        """As any member: check every member's metadata and proof before a single part is sent."""
        for peer_id, raw in zip(group_info.peer_ids, group_info.gathered):
            if peer_id in self._banned:  # another leader's group: we never average with it again
                raise AllreduceException(f"group member {peer_id} is banned by this peer; group refused")
            try:
                user = decode_gather(raw, self.serializer)
            except ValueError as e:
                raise AllreduceException(f"group member {peer_id} has malformed metadata ({e}); group refused") from None
            if peer_id != self.peer_id and not self._is_member(peer_id, user.get("member")):
                self._refuse_outsider(peer_id, "in a group")
                raise AllreduceException(f"group member {peer_id} is not a member of this closed run; group refused")
        return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """Serve the state to members only (closed runs); an empty answer means "ask another donor"."""
        peer = context.remote_id
        if peer in self._banned or not await self._published_member(peer):
            # Refused, not banned: a newcomer's proof may not have reached our DHT view yet.
            if peer not in self._banned and peer not in self._refused_downloads:
                self._refused_downloads.add(peer)
                log.warning("closed run: refused the state to %s, which published no valid membership proof", peer)
            return
        async for message in super().rpc_download_state(request, context):
            yield message

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        if self.residual is not None:
            self.residual.zero_()  # parts we reduce ourselves are never quantized: nothing dropped
        kwargs["compression"] = _SenderCodec(self._codec, self.residual)
        runner = ConsistentAllReduceRunner(
            traffic=self.traffic,
            offender=self._ban,
            aggregation=self._aggregation,
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            raise AllreduceException("p2pdiloco peers never run as auxiliaries")
        try:
            results = [averaged async for averaged in runner]
        finally:
            self.traffic[ENCODE_S], self.traffic[DECODE_S] = self._codec.encode_s, self._codec.decode_s
        if runner.failed_values():
            raise AllreduceException(f"partial all-reduce: {runner.failed_values()} values missing, round discarded")
        self._last_flagged = sorted(p.to_base58() for p in runner.flagged())
        for tensor, averaged in zip(tensors, results):
            tensor.copy_(averaged)

    async def _ban_by_host(self, peer: str, reason: str, future) -> None:
        self._ban(PeerID.from_base58(peer), reason)
        future.set_result(None)

    async def _take_flagged(self, future) -> None:
        flagged, self._last_flagged = self._last_flagged, []
        future.set_result(flagged)

    async def _list_banned(self, future) -> None:
        future.set_result(sorted(p.to_base58() for p in self._banned))

    async def _set_expected_group_size(self, size: int, future) -> None:
        """Form the group as soon as ``size`` members joined instead of waiting min_matchmaking_time."""
        self._matchmaking.target_group_size = size
        self._matchmaking.potential_leaders.target_group_size = size
        future.set_result(None)

    def get_current_state(self):
        """Runs in the host process (hivemind's background thread) when a newcomer asks."""
        metadata, tensors = self._state_fn()
        infos = [CompressionInfo.from_tensor(t, key=i) for i, t in enumerate(tensors)]
        return metadata, tensors, infos

    async def _download_state_from(self, peers: list[str], chunk_timeout: float, future):
        """Try ``peers`` in order; the first complete answer wins. Runs in the averager process."""
        try:
            for peer in peers:
                peer_id = PeerID.from_base58(peer)
                if peer_id == self.peer_id:
                    continue
                if not await self._published_member(peer_id):
                    log.warning("closed run: not downloading the state from %s, which published no valid membership proof", peer)
                    continue
                try:
                    stub = self.get_stub(self._p2p, peer_id, namespace=self.prefix)
                    stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
                    metadata, parts, tensors = None, [], []
                    async for message in aiter_with_timeout(stream, timeout=chunk_timeout):
                        if message.tensor_part.compression != runtime_pb2.CompressionType.NONE:
                            # States travel unquantized; any other codec is the sender's choice of
                            # which decoder (bitsandbytes' native code included) runs on its bytes.
                            raise ValueError("a state tensor in a compressed format")
                        if message.metadata:
                            metadata = self.serializer.loads(message.metadata)
                        if message.tensor_part.dtype and parts:
                            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                            parts = []
                        parts.append(message.tensor_part)
                    if parts:
                        tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    if metadata is not None:
                        future.set_result((peer, metadata, tensors))
                        return
                    log.info("peer %s declined to share its state", peer)
                except Exception as e:
                    log.info("state download from %s failed: %r", peer, e)
        finally:
            if not future.done():
                future.set_result(None)


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

        Raises :class:`AveragingFailed` if no group formed, a member failed, the result was partial,
        or the deadline ``cfg.round_s`` passed.
        """
        cfg = self.cfg
        with self._averager.get_tensors() as (buffer,):
            buffer.copy_(pseudo_gradient)
            fault = faults.reached("send")
            if fault == "nan":
                buffer.fill_(float("nan"))
            elif fault == "inf":
                buffer[0] = float("inf")
            elif fault == "scale":
                buffer.mul_(1000.0)
            elif fault == "random":
                buffer.copy_(torch.randn(buffer.shape) * (100 * buffer.norm() / buffer.numel() ** 0.5))
        if not self._averager.is_alive():
            raise AveragingFailed("the averager process is not running")
        try:  # hivemind's own setters wait without a bound: go through _call
            self._call("_set_group_bits", group_bits=group_bits(epoch, state_hash))  # same state only
            self._call("_set_expected_group_size", size=min(expected_size or self.target_group_size, self.target_group_size))
        except Exception as e:
            raise AveragingFailed(f"the averager did not answer: {e!r}") from None
        started = time.monotonic()
        self._publish_membership()
        proof = {} if self._token is None else {"member": self._token}
        control = self._averager.step(
            gather=dict(gather, epoch=epoch, state_hash=state_hash, **proof), weight=float(weight), timeout=2 * cfg.matchmaking_s,
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
        )

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
        from p2pdiloco.swarm import ensure_stopped

        if self._averager.is_alive():
            try:
                self._averager.shutdown()
            except Exception as e:
                log.debug("averager shutdown: %r", e)
        ensure_stopped(self._averager)
