"""Closed runs: run secrets, membership proofs and MAC'd DHT records (p2pdiloco.auth)."""

import dataclasses
import os

import pytest

from p2pdiloco import auth
from p2pdiloco.errors import ConfigError
from hivemind.dht.validation import DHTRecord

SECRET = b"a-run-secret-of-enough-length-42"


def test_a_proof_is_bound_to_its_peer_id_and_the_secret():
    secret = auth.RunSecret(SECRET)
    token = secret.token(b"peer-a")
    assert len(token) == auth.TOKEN_BYTES
    assert secret.verify(b"peer-a", token)
    assert not secret.verify(b"peer-b", token), "a proof must be worthless under another peer id"
    assert not auth.RunSecret(SECRET + b"x").verify(b"peer-a", token), "another secret must not accept it"
    for junk in (None, "", token.hex(), token[:-1], token + b"\0", 7, [token]):
        assert not secret.verify(b"peer-a", junk)


def test_the_secret_never_shows_in_its_repr_or_attributes():
    secret = auth.RunSecret(SECRET)
    shown = repr(secret) + repr(vars(secret)) + repr(vars(secret.validator()))
    assert SECRET.decode() not in shown and SECRET.hex() not in shown
    assert secret.key_id in repr(secret) and len(secret.key_id) == 8


def test_short_missing_and_mismatched_secrets_fail_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="at least 16"):
        auth.RunSecret(b"short")
    with pytest.raises(ConfigError, match="cannot read"):
        auth.load_secret(tmp_path / "missing.secret")
    assert auth.load_secret(None, environ={}) is None
    with pytest.raises(ConfigError, match="--secret-file"):
        auth.for_run(True, None)
    with pytest.raises(ConfigError, match="run.closed = true"):
        auth.for_run(False, auth.RunSecret(SECRET))


def test_the_secret_comes_from_the_file_else_the_environment(tmp_path):
    path = tmp_path / "run.secret"
    path.write_bytes(SECRET + b"\n")  # `openssl rand -hex 32 > file` leaves a newline
    os.chmod(path, 0o600)
    from_file = auth.load_secret(path, environ={auth.ENV: "another-secret-entirely-123"})
    assert from_file.key_id == auth.RunSecret(SECRET).key_id
    from_env = auth.load_secret(None, environ={auth.ENV: SECRET.decode()})
    assert from_env.key_id == from_file.key_id


def test_record_macs_cover_key_subkey_value_and_expiration():
    mac = auth.RunSecret(SECRET).validator()
    record = DHTRecord(key=b"k", subkey=b"s", value=b"payload", expiration_time=123.5)
    signed = dataclasses.replace(record, value=mac.sign_value(record))
    assert mac.validate(signed) and mac.strip_value(signed) == b"payload"
    for change in (dict(key=b"k2"), dict(subkey=b"s2"), dict(expiration_time=124.0), dict(value=b"x" + signed.value)):
        assert not mac.validate(dataclasses.replace(signed, **change)), change
    assert not mac.validate(record), "an unsigned record must be dropped"
    assert not auth.RunSecret(SECRET + b"!").validator().validate(signed), "another secret's MAC must not pass"
    assert not mac.validate(dataclasses.replace(signed, value=signed.value[:-1] + bytes([signed.value[-1] ^ 1])))


def test_members_dht_drops_a_strangers_records_and_keeps_the_members():
    """Real DHTs: two members of a closed run and a stranger without the secret, on loopback."""
    from hivemind.utils import get_dht_time

    from p2pdiloco.dht import maddrs_of, start_dht, stop_dht

    secret = auth.RunSecret(SECRET)
    first = start_dht(secret=secret)
    nodes = [first]
    try:
        addrs = maddrs_of(first)
        second = start_dht(addrs, secret=secret)
        nodes.append(second)
        stranger = start_dht(addrs)
        nodes.append(stranger)
        expiration = get_dht_time() + 60
        stranger.store("run_progress", {"forged": True}, expiration, subkey="stranger-id")
        assert second.store("run_progress", {"ok": True}, expiration, subkey="member-id")
        found = first.get("run_progress", latest=True)
        assert found is not None and set(found.value) == {"member-id"}, found
        assert second.get("run_progress", latest=True).value["member-id"].value == {"ok": True}
    finally:
        for node in nodes:
            stop_dht(node)


async def _plant_undecodable(_dht, node, key: str = "run_progress", subkey: str = "stranger") -> None:
    """A stranger's node stores bytes no msgpack decoder accepts under one subkey, as a hostile
    DHT node would serve them (its own storage is its own business)."""
    from hivemind.dht.routing import DHTID

    from hivemind.utils import get_dht_time

    node.protocol.storage.store_subkey(DHTID.generate(source=key), subkey, b"\xc1\xc1garbage", get_dht_time() + 60)


def test_one_undecodable_subkey_does_not_hide_the_others():
    """Real DHTs: hivemind alone would time out reading the whole key (fuzzing found it)."""
    from hivemind.utils import get_dht_time

    from p2pdiloco.dht import maddrs_of, start_dht, stop_dht

    reader = start_dht()
    nodes = [reader]
    try:
        stranger = start_dht(maddrs_of(reader))
        nodes.append(stranger)
        expiration = get_dht_time() + 60
        assert reader.store("run_progress", {"ok": True}, expiration, subkey="honest")
        stranger.run_coroutine(_plant_undecodable)
        found = reader.get("run_progress", latest=True, return_future=True).result(timeout=10)
        assert found is not None and set(found.value) == {"honest"}, found
    finally:
        for node in nodes:
            stop_dht(node)
