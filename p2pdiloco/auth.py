"""Closed runs: membership proven from a shared run secret.

hivemind's averaging calls are not authenticated: anyone who finds a run's DHT can join its
matchmaking groups and put any values into every member's average. A *closed* run
(``run.closed = true``) admits only peers that hold the run secret. Three things use it:

Membership proofs
    A peer's proof is ``HMAC(key, peer id)``. libp2p authenticates every connection's peer id
    (Noise/TLS with the peer's key), so a proof is worth nothing to anyone else: a stranger who
    reads one cannot present it under its own id. Proofs travel in the matchmaking metadata
    (``gather``), are checked by the leader on each join request and by every member for every
    other member when the group forms, before any tensor is exchanged; a peer without a valid
    proof is refused, logged with its peer id, and banned from this peer's groups. State
    downloads are served to, and fetched from, members only (proofs are published in the DHT
    under ``{prefix}.members``, see :class:`p2pdiloco.averaging.PseudoGradientAverager`).
Signed records
    Every DHT record a member stores carries ``HMAC(key, key | subkey | value | expiration)``
    (:class:`RecordMAC`, a hivemind record validator). Members drop records without a valid MAC,
    both when asked to store them and when they read them, so strangers cannot forge progress,
    config, matchmaking or membership records.
Key id
    ``key_id`` (8 hex digits derived from the key) lets two operators check they hold the same
    secret without showing it. The secret itself never appears in logs, metrics, records or the
    dashboard.

The secret comes from ``--secret-file FILE`` or the environment variable
``P2PDILOCO_RUN_SECRET``, never from the command line (visible to every local user in ``ps``).

What a closed run does not hide: the DHT's records can still be *read* by anyone who reaches it
(peer ids, addresses, losses, epochs); tensors are never served to strangers. Revoking one
volunteer means changing the secret for everyone (per-peer keys signed by the coordinator would
avoid that; not built yet).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import struct
from pathlib import Path

from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from p2pdiloco.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "P2PDILOCO_RUN_SECRET"
MIN_SECRET_BYTES = 16
TOKEN_BYTES = 32
_MAC_MAGIC = b"\x00p2pdiloco-mac\x00"
_MAC_SUFFIX = len(_MAC_MAGIC) + 32
_HOW = "e.g. 'openssl rand -hex 32 > run.secret', then give every peer --secret-file run.secret"


class RunSecret:
    """The keys derived from a run secret. Holds no copy of the secret itself."""

    def __init__(self, secret: bytes):
        secret = secret.strip()
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"the run secret is {len(secret)} bytes long: use at least {MIN_SECRET_BYTES} random bytes, {_HOW}")
        # Separate keys per use: a membership proof can never be replayed as a record MAC.
        self._member_key = hmac.new(secret, b"p2pdiloco/v1/member", hashlib.sha256).digest()
        self._record_key = hmac.new(secret, b"p2pdiloco/v1/record", hashlib.sha256).digest()
        self.key_id = hmac.new(secret, b"p2pdiloco/v1/key-id", hashlib.sha256).hexdigest()[:8]

    def __repr__(self) -> str:
        return f"RunSecret(key id {self.key_id})"

    def token(self, peer_id: bytes) -> bytes:
        """This peer id's proof of membership."""
        return hmac.new(self._member_key, b"peer:" + peer_id, hashlib.sha256).digest()

    def verify(self, peer_id: bytes, token: object) -> bool:
        """Whether ``token`` (from the network: any type) proves that ``peer_id`` is a member."""
        if not isinstance(token, bytes) or len(token) != TOKEN_BYTES or not isinstance(peer_id, bytes):
            return False
        return hmac.compare_digest(self.token(peer_id), token)

    def validator(self) -> "RecordMAC":
        return RecordMAC(self._record_key)


class RecordMAC(RecordValidatorBase):
    """A hivemind record validator: members MAC every record they store and accept only MAC'd ones.

    The MAC covers the record's key, subkey, value and expiration, so none of them can be changed
    or a value moved to another key; the value carries the MAC as a suffix that is stripped
    before the application sees it.
    """

    def __init__(self, key: bytes):
        self._key = key

    def _mac(self, record: DHTRecord, value: bytes) -> bytes:
        fields = (record.key, record.subkey, value)
        blob = b"".join(struct.pack(">Q", len(f)) + f for f in fields) + struct.pack(">d", record.expiration_time)
        return hmac.new(self._key, blob, hashlib.sha256).digest()

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value + _MAC_MAGIC + self._mac(record, record.value)

    def validate(self, record: DHTRecord) -> bool:
        value = record.value
        if not isinstance(value, bytes) or len(value) < _MAC_SUFFIX or value[-_MAC_SUFFIX:-32] != _MAC_MAGIC:
            return False
        return hmac.compare_digest(self._mac(record, value[:-_MAC_SUFFIX]), value[-32:])

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value[:-_MAC_SUFFIX]

    @property
    def priority(self) -> int:
        return 1000  # signs last, over what every other validator added; checks first

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


def load_secret(secret_file: str | Path | None = None, environ=None) -> RunSecret | None:
    """The run secret from ``secret_file``, else from ``$P2PDILOCO_RUN_SECRET``; None if neither.

    Raises :class:`ConfigError` (one line, naming the fix) for a missing, unreadable or short secret.
    """
    environ = os.environ if environ is None else environ
    if secret_file is not None:
        path = Path(secret_file).expanduser()
        try:
            raw = path.read_bytes()
            mode = path.stat().st_mode
        except OSError as e:
            raise ConfigError(f"--secret-file {path}: cannot read it ({e.strerror}): give the file holding the run secret") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the run secret file %s is readable by other users: chmod 600 %s", path, path)
        return RunSecret(raw)
    value = environ.get(ENV)
    return RunSecret(value.encode()) if value else None


def for_run(closed: bool, secret: RunSecret | None) -> RunSecret | None:
    """Check that a secret is given exactly when the run is closed; the secret to use, or None."""
    if closed and secret is None:
        raise ConfigError(f"this run is closed (run.closed = true): give its secret with --secret-file FILE or ${ENV}")
    if not closed and secret is not None:
        raise ConfigError(
            f"a run secret was given (--secret-file or ${ENV}) but the run is open: set run.closed = true in the recipe "
            "(on every peer), or drop the secret"
        )
    if secret is not None:
        log.info("closed run: membership key id %s", secret.key_id)
    return secret
