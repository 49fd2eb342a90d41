"""A run's records in the DHT and the rule that picks one state when groups fork.

Starting and watching the DHT node itself is :mod:`p2pdiloco.dht`.

Keys (all under the run's name):

``{run}_config``
    The run config's fingerprint and canonical content, so a joining peer with a different
    config can be refused with the list of differing keys.
``{run}_progress``
    One subkey per peer: a :class:`Progress` record (epoch, state digest, speed, loss). The
    swarm's epoch is the largest epoch among live records; the digest lets a peer see that its
    state differs from the swarm's for its epoch.
``p2pdiloco_runs``
    One subkey per run name, so ``p2pdiloco status`` can list runs without knowing their names.

Records read from the DHT come from strangers: each is validated with pydantic and dropped if
malformed, never trusted as-is.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from p2pdiloco.errors import ConfigMismatch, SwarmError

log = logging.getLogger(__name__)

RUNS_KEY = "p2pdiloco_runs"


RECENT_ROUNDS = 8  # rounds a progress record recalls


class RoundStat(BaseModel):
    """One completed all-reduce round of a peer, as its progress record recalls it."""

    model_config = ConfigDict(extra="ignore")
    epoch: int = Field(ge=0)  # the epoch the round's outer step reached
    group_size: int = Field(ge=1, le=100_000)
    # members whose pseudo-gradients are in the round's average; 0: not said (a record from before the field)
    contributors: int = Field(0, ge=0, le=100_000)
    allreduce_s: float = Field(ge=0, le=1e6)
    bytes_sent: int = Field(ge=0)  # by this peer in that round


class Progress(BaseModel):
    """What a peer tells the swarm about itself, refreshed every epoch."""

    model_config = ConfigDict(extra="ignore")
    peer: str = Field(max_length=128)
    epoch: int = Field(ge=0)
    state_hash: str = Field(max_length=64)
    tokens_per_s: float = Field(0.0, ge=0)
    speed: float = Field(0.0, ge=0, le=1e6)  # inner steps per second of compute (DyLU); 0 = not measured yet
    train_loss: float | None = None
    val_loss: float | None = None
    val_epoch: int | None = Field(None, ge=0)  # the epoch of the global parameters val_loss was measured on
    shard: int = Field(0, ge=0)
    time: float = 0.0
    ready: bool = False  # finished its inner phase and waiting to average
    leaving: bool = False
    backup: bool = False  # a coordinator's copy of the state: a donor, never a training peer
    # This peer's last few rounds, oldest first, so a dashboard polling slower than the epochs
    # go by still sees every round; and the bytes it sent in all its rounds since it started.
    rounds: list[RoundStat] = Field(default_factory=list, max_length=RECENT_ROUNDS)
    bytes_sent_total: int = Field(0, ge=0)
    one_sided: int = Field(0, ge=0)  # rounds that may have ended one-sided here (README, "one_sided")
    client: bool = False  # cannot be dialed (client mode): never an owner in a two-level round (docs/scaling.md)
    # where this peer trains, one entry per local worker (peer.devices; docs/multi-gpu.md); [] = not said
    devices: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("devices")
    @classmethod
    def _short_names(cls, devices: list[str]) -> list[str]:
        if any(len(d) > 32 for d in devices):
            raise ValueError("device names are short (cpu, cuda:N)")
        return devices


def devices_label(devices: list[str]) -> str:
    """A peer's devices in a few characters: ``cuda:1`` for one, ``4×cuda`` or ``2×cpu`` for several
    local workers, ``-`` when the record does not say (an older peer, a backup)."""
    if len(devices) <= 1:
        return devices[0] if devices else "-"
    counts: dict[str, int] = {}
    for device in devices:
        kind = device.split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n}×{kind}" for kind, n in counts.items())


def fork_settled(counts: Mapping[str, int], winner: str, pending: int) -> bool:
    """Whether ``winner`` (most peers; ties to the smallest digest) stays the winner of a fork
    whatever digests the ``pending`` peers still behind the epoch arrive with.

    The worst case for the winner is all of them joining its strongest rival, or all holding one
    digest not seen yet (which, being unknown, might also win a tie).
    """
    mine = counts.get(winner, 0)
    for digest, count in counts.items():
        if digest != winner and (count + pending > mine or (count + pending == mine and digest < winner)):
            return False
    return pending < mine


def winning_state(records: Mapping[str, Progress], epoch: int, own: tuple[int, str] | None = None, *,
                  settled: bool = True) -> str | None:
    """The fork rule: the state digest a run converges on at ``epoch``, from the peers' ``records``
    (``own``: the judging peer's own (epoch, digest), a vote like any other; a backup has none).

    Two groups at one epoch apply different averages (a fork). Every peer, and a coordinator's
    backup, applies this rule to the same records: the digest held by the most peers wins, a tie
    goes to the smallest. Peers still behind ``epoch`` may be finishing a round at it with yet
    another digest, so with ``settled`` the answer is None until the outcome no longer depends on
    where they land (:func:`fork_settled`): two peers judging from such partial views once
    downloaded each other's branch, keeping the fork alive another epoch. None also when nobody
    holds a state of ``epoch``.
    """
    counts = Counter(r.state_hash for r in records.values() if r.epoch == epoch)
    if own is not None and own[0] == epoch:
        counts[own[1]] += 1
    if not counts:
        return None
    winner = min(counts, key=lambda h: (-counts[h], h))
    if settled and not fork_settled(counts, winner, pending=sum(r.epoch < epoch for r in records.values())):
        return None
    return winner


def progress_key(run: str) -> str:
    return f"{run}_progress"


def config_key(run: str) -> str:
    return f"{run}_config"


def read_progress(dht, run: str, timeout: float = 10.0, include_leaving: bool = False) -> dict[str, Progress] | None:
    """Live progress records of the run, by peer id; malformed records are dropped, and so are
    the farewell records of peers that left unless ``include_leaving``.

    Returns None when the DHT could not be read in time: "unknown" must never be mistaken for
    "no other peer" (a peer that believes it is alone applies a private outer step).
    """
    try:
        found = dht.get(progress_key(run), latest=True, return_future=True).result(timeout=timeout)
    except Exception as e:
        log.warning("could not read the swarm's progress from the DHT: %r", e)
        return None
    if found is None or not isinstance(found.value, dict):
        return {}
    records = {}
    for subkey, item in found.value.items():
        record = parse_progress(subkey, getattr(item, "value", None))
        if record is not None and (include_leaving or not record.leaving):
            records[record.peer] = record
    return records


def parse_progress(subkey: Any, value: Any) -> Progress | None:
    """The :class:`Progress` record a stranger stored under ``subkey`` of ``{run}_progress`` (both
    as the DHT deserialized them: any msgpack value), or None if it is malformed or names another
    peer than its subkey. Never raises: one bad record must not hide the others."""
    try:
        record = Progress.model_validate(value)
    except (ValidationError, AttributeError, TypeError):
        log.debug("dropped a malformed progress record under %.80r", subkey)
        return None
    # Only a str can name a peer: a subkey is any hashable msgpack value, and str() of a stranger's
    # bytes or deeply nested tuple is at best a false match and at worst a RecursionError.
    return record if isinstance(subkey, str) and subkey == record.peer else None


def publish_progress(dht, run: str, record: Progress, ttl: float, timeout: float | None = None) -> None:
    """Store this peer's record. Fire and forget unless ``timeout`` is given (publishing must never
    stall training); with ``timeout``, wait up to that long for the store (used when leaving)."""
    from hivemind.utils import get_dht_time

    future = dht.store(
        progress_key(run),
        subkey=record.peer,
        value=record.model_dump(),
        expiration_time=get_dht_time() + ttl,
        return_future=True,
    )
    if timeout is not None:
        future.result(timeout=timeout)
    dht.store(RUNS_KEY, subkey=run, value={"time": time.time()}, expiration_time=get_dht_time() + ttl, return_future=True)


def check_fingerprint(dht, run: str, fingerprint: str, canonical: dict, ttl: float, timeout: float = 10.0) -> bool:
    """Refuse to join a run whose published config differs from ours; publish ours otherwise.

    Returns True if the run's config was already published (the run exists), False if this peer
    is the first. Raises :class:`ConfigMismatch` listing the differing keys (:func:`config_mismatch`).
    """
    try:
        found = dht.get(config_key(run), latest=True, return_future=True).result(timeout=timeout)
    except Exception as e:
        raise SwarmError(f"could not read run '{run}' from the DHT within {timeout:.0f} s ({e!r}): check --peers") from None
    existing = found.value if found is not None and isinstance(found.value, dict) else None
    mismatch = config_mismatch(existing, run=run, fingerprint=fingerprint, canonical=canonical)
    if mismatch is not None:
        raise ConfigMismatch(mismatch)
    publish_config(dht, run, fingerprint, canonical, ttl).result(timeout=timeout)  # so a peer starting next sees it
    return existing is not None


def config_mismatch(published: Any, *, run: str, fingerprint: str, canonical: dict) -> str | None:
    """Why this peer (``fingerprint``, ``canonical``) may not join run ``run`` whose ``{run}_config``
    record holds ``published`` (any msgpack value, from a stranger), or None if it may: the record
    is absent, empty, not a dict, or has our fingerprint. Never raises."""
    from p2pdiloco.config import diff_keys

    if not (isinstance(published, dict) and published) or published.get("fingerprint") == fingerprint:
        return None
    theirs = published.get("config") if isinstance(published.get("config"), dict) else {}
    try:
        diffs = diff_keys(canonical, theirs)
    except (TypeError, RecursionError):
        # msgpack map keys may be bytes, which diff_keys cannot sort among our str keys (TypeError),
        # and the repr of a value nested ~1000 deep exceeds the recursion limit: neither is a config.
        diffs = []
    diffs = [d if len(d) <= 200 else d[:197] + "..." for d in diffs[:8]] or ["(the published config could not be read)"]
    # A stranger's fingerprint is shown only if it is a short str: str() of anything else can be
    # huge or (nested ~1000 deep) raise RecursionError.
    shown = published.get("fingerprint")
    shown = shown if isinstance(shown, str) and len(shown) <= 64 else "missing" if shown is None else "unreadable"
    return (
        f"this config (fingerprint {fingerprint}) differs from run '{run}' (fingerprint "
        f"{shown}) in: {'; '.join(diffs)}: use the run's recipe, or another run.name"
    )


def publish_config(dht, run: str, fingerprint: str, canonical: dict, ttl: float):
    """(Re)publish the run config record; peers refresh it every epoch so it outlives any one of them."""
    from hivemind.utils import get_dht_time

    return dht.store(
        config_key(run),
        {"fingerprint": fingerprint, "config": canonical},
        expiration_time=get_dht_time() + ttl,
        return_future=True,
    )
