"""The fuzzing harness (bench/fuzz.py), briefly: every registered decoder of network input gets
200 hypothesis inputs (seeded, so a run is reproducible) and none may crash or hang; plus the
crashes the harness found, each pinned by a small regression test."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_harness():
    spec = importlib.util.spec_from_file_location("p2pdiloco_bench_fuzz", ROOT / "bench" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fuzz = _load_harness()


@pytest.fixture(autouse=True)
def _quiet_decoders():
    previous = fuzz.quiet_logs()  # thousands of "dropped a malformed record" lines otherwise
    yield
    fuzz.restore_logs(previous)


@pytest.mark.parametrize("name", sorted(fuzz.TARGETS))
def test_decoder_survives_fuzzed_inputs(name):
    stats = fuzz.run_target(fuzz.TARGETS[name], 200, seed=0)
    assert stats.ok, f"{name}: {stats.crashes} crash(es), {stats.hangs} hang(s); first: {stats.first_failure}"
    assert stats.tried >= 100, stats.as_dict()  # hypothesis stopping early would make this vacuous
    # Near-valid inputs reach both outcomes: a fuzzer only ever rejected tests the first check.
    assert stats.accepted and stats.rejected, stats.as_dict()
    assert stats.max_s < fuzz.HANG_S


def test_a_decoder_that_kills_its_worker_is_a_crash_with_its_input_and_the_rest_still_run(monkeypatch):
    # selftest_kill (registered in the worker by the environment variable) dies on its 5th input:
    # a crash of that target, with that input, while the next target runs in a new worker.
    monkeypatch.setenv(fuzz.SELFTEST_ENV, "1")
    killer = fuzz.Target("selftest_kill", fuzz.st.integers(), lambda value: None, (ValueError,))  # only its name travels
    dead, survivor = fuzz.run_isolated([killer, fuzz.TARGETS["config_record"]], 20, seed=1)
    assert (dead.target, dead.crashes, dead.tried, dead.rejected) == ("selftest_kill", 1, 5, 4)
    assert dead.first_failure["kind"] == "SIGKILL" and dead.first_failure["input"] is not None
    assert survivor.target == "config_record" and survivor.ok and survivor.tried == 20
    table = fuzz.format_table([dead, survivor])
    assert table.splitlines()[-1].split()[:6] == ["total", "25", str(survivor.accepted), str(4 + survivor.rejected), "1", "0"]


def test_the_script_prints_the_table_and_writes_the_summary(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = fuzz.main(["--examples", "20", "--targets", "state_header", "--seed", "1", "--json", str(tmp_path / "f.json"), "--in-process"])
    finally:
        torch.set_num_threads(threads)  # main() sets 1 for its timings
    assert code == 0
    printed = capsys.readouterr().out
    assert "state_header" in printed and "no crash or hang" in printed
    summary = json.loads((tmp_path / "f.json").read_text())
    assert summary["ok"] and summary["totals"]["tried"] == 20 == summary["targets"]["state_header"]["tried"]


def test_an_unknown_target_is_refused_by_name():
    with pytest.raises(SystemExit, match="unknown fuzz target"):
        fuzz.select_targets("codecs,nope")


# ------------------------------------------------------------------ the crashes the fuzzer found
def test_deeply_nested_msgpack_ext_values_are_refused_not_a_segfault():
    # 200 tuples in tuples (936 bytes): hivemind's decoder recursed through msgpack's C code
    # until the process died of SIGSEGV. In a child process, so that a regression cannot kill pytest.
    script = """
import msgpack
from hivemind.utils.serializer import MSGPackSerializer
from p2pdiloco.dht import MAX_EXT_NESTING, bound_msgpack_nesting
bound_msgpack_nesting()
def nested(depth):
    data = b"\\x91\\x01"
    for _ in range(depth - 1):
        data = b"\\x91" + msgpack.packb(msgpack.ExtType(0x40, data))
    return msgpack.packb(msgpack.ExtType(0x40, data))
value = MSGPackSerializer.loads(nested(MAX_EXT_NESTING))
assert isinstance(value, tuple)
try:
    MSGPackSerializer.loads(nested(200))
except ValueError as e:
    print("refused:", e)
assert MSGPackSerializer.loads(MSGPackSerializer.dumps((1, (2, "a"), [3]))) == (1, (2, "a"), [3])
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, f"exit code {r.returncode}: {r.stderr[-2000:]}"
    assert "refused: msgpack ext values nested deeper than" in r.stdout


def test_a_donor_tensor_that_requires_grad_is_refused():
    from p2pdiloco.errors import StateDownloadFailed
    from p2pdiloco.outer import OuterState

    src = OuterState(torch.randn(8), optimizer="nesterov", lr=0.7, momentum=0.9)
    meta = dict(src.meta(), fingerprint="fp")
    dst = OuterState(torch.zeros(8), optimizer="nesterov", lr=0.7, momentum=0.9)
    # hivemind's deserialize_torch_tensor sets requires_grad as the sender asks; the digest then
    # raised a RuntimeError (numpy() of a tensor that requires grad) out of the download
    with pytest.raises(StateDownloadFailed, match="requires grad"):
        dst.validate(meta, [t.clone().requires_grad_(True) for t in src.tensors()], fingerprint="fp")
    with pytest.raises(StateDownloadFailed, match="no digest"):  # _try_donors then read meta["state_hash"]: KeyError
        dst.validate({k: v for k, v in meta.items() if k != "state_hash"}, [t.clone() for t in src.tensors()], fingerprint="fp")
    with pytest.raises(StateDownloadFailed, match="epoch"):
        dst.validate(dict(meta, epoch=True), [t.clone() for t in src.tensors()], fingerprint="fp")
    header = dst.validate(meta, [t.clone() for t in src.tensors()], fingerprint="fp")
    dst.adopt(header, [t.clone() for t in src.tensors()])
    assert dst.state_hash == src.state_hash == dst.digest()


def test_a_published_config_with_bytes_keys_or_deep_values_is_a_mismatch_not_a_crash():
    from p2pdiloco.swarm import config_mismatch

    canonical = {"seed": 0, "model": {"hidden_size": 64}}
    deep = 1
    for _ in range(990):
        deep = [deep]
    for theirs in ({**canonical, b"seed": 1}, {**canonical, "seed": deep}):  # TypeError, RecursionError before
        message = config_mismatch({"fingerprint": "0" * 16, "config": theirs}, run="r", fingerprint="f" * 16, canonical=canonical)
        assert message.startswith("this config (fingerprint ffff") and len(message) < 1000
    message = config_mismatch({"fingerprint": deep, "config": canonical}, run="r", fingerprint="f" * 16, canonical=canonical)
    assert "(fingerprint unreadable)" in message
    assert config_mismatch({"fingerprint": "f" * 16}, run="r", fingerprint="f" * 16, canonical=canonical) is None


def test_a_codec_part_with_a_zero_size_and_absurd_others_is_refused():
    from hivemind.proto import runtime_pb2

    from p2pdiloco.codecs import make_codec

    codec = make_codec("none")
    part = runtime_pb2.Tensor(dtype=codec.tag, size=[0] + [2**32 - 1] * 3, buffer=b"")  # torch.zeros: stride overflow
    with pytest.raises(ValueError, match="malformed part shape"):
        codec.extract(part)
    assert codec.extract(runtime_pb2.Tensor(dtype=codec.tag, size=[0, 5], buffer=b"")).shape == (0, 5)
