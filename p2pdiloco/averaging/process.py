"""The averager process: hivemind's ``DecentralizedAverager`` with p2pdiloco's rules at its doors.

hivemind runs each averager in a process of its own; this subclass is what runs there. It
builds a :class:`~p2pdiloco.averaging.runner.ConsistentAllReduceRunner` for every group, keeps the
shared traffic counters and the error-feedback buffer the host reads, refuses banned peers and (in
a closed run) non-members before any tensor is exchanged, and serves and downloads the outer state
(``get_current_state``, ``rpc_download_state``, ``_download_state_from``). The host talks to it
through :class:`~p2pdiloco.averaging.front.PseudoGradientAverager`.

hivemind is pinned exactly because this relies on private attributes of its averager, matchmaking,
``AllReduceRunner`` and ``TensorPartContainer`` in 1.1.12.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable, Sequence

import torch
from hivemind import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.partition import AllreduceException
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.streaming import combine_from_streaming

from p2pdiloco import faults
from p2pdiloco.auth import RunSecret
from p2pdiloco.averaging.runner import DECODE_S, ENCODE_S, ConsistentAllReduceRunner, SenderCodec
from p2pdiloco.averaging.twolevel import TwoLevel
from p2pdiloco.averaging.wire import DONE_TTL_S, decode_gather, done_key
from p2pdiloco.codecs import Codec
from p2pdiloco.config import AggregationConfig

log = logging.getLogger(__name__)


# The class name is on the wire: hivemind names each rpc handler "{class name}.{method}", so
# renaming it changes the protocol every peer speaks.
class _Averager(TwoLevel, DecentralizedAverager):
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
        self._background: set[asyncio.Task] = set()
        # Two-level rounds (TwoLevel): messages may come before our own first round starts.
        self._tl_size, self._tl_silence = size, float(kwargs.get("next_chunk_timeout") or 10.0)
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
        """As any member: check every member's metadata and proof before a single part is sent.

        If our round fails (a refused group, a missing part), we file "failed" under the round's
        name at once: the members whose result is complete would otherwise wait ``commit_s`` for
        our confirmation before giving the round up (:meth:`PseudoGradientAverager._commit`)."""
        users = {}
        try:
            for peer_id, raw in zip(group_info.peer_ids, group_info.gathered):
                if peer_id in self._banned:  # another leader's group: we never average with it again
                    raise AllreduceException(f"group member {peer_id} is banned by this peer; group refused")
                try:
                    users[peer_id.to_base58()] = user = decode_gather(raw, self.serializer)
                except ValueError as e:
                    raise AllreduceException(f"group member {peer_id} has malformed metadata ({e}); group refused") from None
                if peer_id != self.peer_id and not self._is_member(peer_id, user.get("member")):
                    self._refuse_outsider(peer_id, "in a group")
                    raise AllreduceException(f"group member {peer_id} is not a member of this closed run; group refused")
            return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        except BaseException:
            if len(users) == len(group_info.peer_ids):  # the round's name needs every member's nonce
                task = asyncio.create_task(self._file_failed(done_key(self.prefix, users)))
                self._background.add(task)  # a task nobody holds can be collected before it runs
                task.add_done_callback(self._background.discard)
            raise

    async def _file_failed(self, key: str) -> None:
        try:
            stored = self.dht.store(key, False, get_dht_time() + DONE_TTL_S, subkey=self.peer_id.to_base58(), return_future=True)
            await asyncio.wait_for(stored, self._request_s)
        except Exception as e:  # the others then wait commit_s, as before
            log.debug("could not file this round's failure: %r", e)

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
        kwargs["compression"] = SenderCodec(self._codec, self.residual)
        runner = ConsistentAllReduceRunner(
            traffic=self.traffic,
            offender=self._ban,
            aggregation=self._aggregation,
            codec=self._codec,
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
        if faults.reached("result") == "drop":  # tests: a one-sided round on purpose
            raise AllreduceException("fault injection: this member's round fails after every part arrived")
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
