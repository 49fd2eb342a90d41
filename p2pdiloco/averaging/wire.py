"""What strangers send, checked: pure functions over bytes and tensors that arrive from the network.

Every value here comes from another peer, possibly a broken or hostile one, so each check either
returns a well-formed value or refuses (ValueError, an empty result, False) and never crashes the
caller. Nothing here runs hivemind's process or an event loop: these functions are the fuzz
targets of ``bench/fuzz.py`` and can be called on any input in isolation.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Iterable, Sequence

import torch
from hivemind.averaging.allreduce import AveragingMode
from hivemind.p2p import PeerID

from p2pdiloco.auth import TOKEN_BYTES

MAX_GATHER_BYTES = 4096  # one member's matchmaking metadata; ours is about 200 bytes


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


def reducer_note(excluded: Iterable[PeerID], flagged: Iterable[PeerID]) -> bytes:
    """The note a reducer sends with each average (the format :func:`parse_reducer_note` reads)."""
    return "|".join(",".join(sorted(p.to_base58() for p in group)) for group in (excluded, flagged)).encode()


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


def part_fits(part: torch.Tensor, index: int, count: int, shape_of: Callable[[int], torch.Size]) -> bool:
    """Whether a received part is one of the ``count`` expected and has the shape of the
    ``index``-th (``shape_of`` is asked only for an index in range)."""
    return index < count and part.shape == shape_of(index)


def all_finite(values: torch.Tensor) -> bool:
    return bool(torch.isfinite(values).all())


def usable_contribution(part: torch.Tensor, weight: float) -> bool:
    """A member's part for us to reduce: a finite, positive weight and finite values."""
    return math.isfinite(weight) and weight > 0 and all_finite(part)


def group_bits(epoch: int, state_hash: str) -> str:
    """16 matchmaking bits from the epoch and the state digest: peers meet only their own state."""
    digest = hashlib.sha256(f"{epoch}:{state_hash}".encode()).digest()
    return format(int.from_bytes(digest[:2], "big"), "016b")


def round_key(gathered: dict[str, dict]) -> str:
    """A name for one all-reduce attempt, the same on every member: a digest of the members and
    the fresh ``nonce`` each put in its metadata (so a retry by the same members is another round).
    The members' "done" records are filed under it (see :meth:`PseudoGradientAverager._commit`)."""
    entries = sorted(f"{peer}:{data.get('nonce', '') if isinstance(data, dict) else ''}" for peer, data in gathered.items())
    return hashlib.sha256("|".join(entries).encode()).hexdigest()[:32]


DONE_TTL_S = 600.0  # a round's "done"/"failed" records only matter while it commits


def done_key(prefix: str, gathered: dict[str, dict]) -> str:
    """The DHT key under which the members of one round file "done" (True) or "failed" (False),
    each under its own peer id as the subkey."""
    return f"{prefix}.done.{round_key(gathered)}"


def unconfirmed(members: Iterable[str], done: Iterable[str], excused: Iterable[str]) -> set[str]:
    """Members that have not (yet) confirmed holding the whole result, less the ``excused`` ones
    (left out of this round for sending garbage: they never hold it, and must not hold up the rest)."""
    return set(members) - set(done) - set(excused)


def commit_state(members: Iterable[str], records: dict[str, Any], excused: Iterable[str]) -> tuple[set[str], set[str]]:
    """From a round's records (subkey -> value), ``(unconfirmed, failed)``: the members that have not
    filed "done" yet, and those that filed "failed" (their all-reduce of this round failed, so
    waiting for them is pointless). Records of non-members, and other values, count for nothing."""
    members, excused = set(members), set(excused)
    done = {peer for peer, value in records.items() if value is True}
    failed = {peer for peer, value in records.items() if value is False} & members
    return unconfirmed(members, done, excused), failed - excused
