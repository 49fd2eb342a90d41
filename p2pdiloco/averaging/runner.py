"""The all-reduce of one round: how parts are encoded, reduced and the averages sent back.

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

:class:`RobustPartReducer` swaps the reducer's running mean for :mod:`p2pdiloco.robust`, and
:class:`SenderCodec` records what quantizing our own parts dropped (error feedback). What other
peers send is checked with :mod:`p2pdiloco.averaging.wire` before it is used.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, AsyncIterator, Callable

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.compression import CompressionBase
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, attach_event_on_finished

from p2pdiloco import faults, robust
from p2pdiloco.averaging.wire import all_finite, parse_reducer_note, part_fits, reducer_note, usable_contribution
from p2pdiloco.codecs import Codec
from p2pdiloco.config import AggregationConfig

log = logging.getLogger(__name__)

SENT, RECEIVED, ENCODE_S, DECODE_S = range(4)  # the shared counters of an averager


class SenderCodec(CompressionBase):
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
                result, flagged = robust.aggregate_with(
                    [collected[s][0] for s in senders], [collected[s][1] for s in senders], self.aggregation
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


class ConsistentAllReduceRunner(AllReduceRunner):
    """Butterfly all-reduce whose reducers send the same serialized average to every member.

    ``traffic`` is a shared-memory float64 tensor indexed by ``SENT``/``RECEIVED`` that this
    runner (in the averager process) adds to; the host process reads it after the round. Every
    part is encoded and decoded with the run's :class:`~p2pdiloco.codecs.Codec`, whose ``extract``
    validates tag, shape and length before decoding.
    """

    def __init__(self, *, traffic: torch.Tensor, offender: Callable[[PeerID, str], None], aggregation: AggregationConfig,
                 codec: Codec, **kwargs):
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
        self.codec = codec  # the one our parts went out with (hivemind's container holds it wrapped in a SenderCodec)
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
                if not part_fits(averaged, part_index, expected, functools.partial(self._expected_shape, peer_index)):
                    self.offender(peer_id, "sent an average of the wrong size")
                    raise AllreduceException(f"{peer_id} sent a part of the wrong size")
                if not all_finite(averaged):
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
                if not part_fits(part, part_index, len(expected_shapes), expected_shapes.__getitem__):
                    self.excluded.add(self.sender_peer_ids[sender_index])
                    self.offender(self.sender_peer_ids[sender_index], "sent a part of the wrong size")
                    raise AllreduceException(f"sender {sender_index} sent a part of the wrong size")
                if not usable_contribution(part, weight):
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
        return reducer_note(self.excluded, flagged)

