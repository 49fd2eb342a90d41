import subprocess
import sys


def test_help_imports_no_torch():
    code = (
        "import sys; from p2pdiloco.cli import app; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "assert 'simulate' in r.output and 'join' in r.output; "
        "heavy = [m for m in ('torch', 'hivemind', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_config_is_one_line_and_nonzero(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nbogus = 1\n")
    r = subprocess.run([sys.executable, "-m", "p2pdiloco", "join", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {bad}: unknown key 'run.bogus': check its spelling against docs/config.md"]


def test_malformed_peer_address_is_rejected():
    r = subprocess.run(
        [sys.executable, "-m", "p2pdiloco", "join", "test", "--peers", "not-an-address"], capture_output=True, text=True
    )
    assert r.returncode == 4
    assert "is not a multiaddr" in r.stderr.splitlines()[-1]


def _join(*args, env=None):
    """Run ``join`` in a session of its own; on a hang, kill the whole group (DHT, averager, p2pd)."""
    import os
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "p2pdiloco", "join", "test", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of it may outlive the test
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_unreachable_peer_is_one_line_naming_the_address(data_cache):
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooWJGoZ4sjXxivWoJsopoW9aoYQRtjyPkEfzEJ7kPS4KC34"
    r = _join("--peers", addr, "--set", "peer.bootstrap_s=5", "--set", f'peer.cache_dir="{data_cache}"')
    assert r.returncode == 4
    last = r.stderr.splitlines()[-1]
    assert last.startswith("error: ") and addr in last, last


def test_corrupt_checkpoint_is_one_line_and_left_in_place(tmp_path, data_cache):
    from p2pdiloco.checkpoint import checkpoint_path

    path = checkpoint_path(tmp_path)
    path.write_bytes(b"not a checkpoint")
    r = _join("--checkpoint-dir", str(tmp_path), "--set", f'peer.cache_dir="{data_cache}"')
    assert r.returncode == 6
    last = r.stderr.splitlines()[-1]
    assert last.startswith("error: ") and "move it away" in last, last
    assert path.read_bytes() == b"not a checkpoint"  # nothing already saved is touched


def test_out_of_memory_on_the_first_step_suggests_a_smaller_micro_batch(data_cache):
    import os

    r = _join("--set", f'peer.cache_dir="{data_cache}"', env=dict(os.environ, P2PDILOCO_FAULT="inner:oom@1"))
    assert r.returncode == 7
    last = r.stderr.splitlines()[-1]
    assert last.startswith("error: out of memory") and "--set peer.micro_batch_size=4" in last, last


def test_port_in_use_is_one_line_naming_the_fix(data_cache):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _join("--port", str(port), "--set", f'peer.cache_dir="{data_cache}"')
    assert r.returncode == 4
    assert r.stderr.splitlines()[-1] == f"error: port {port} on 127.0.0.1 is already in use: choose another --port (or 0 for any free port)"


def test_missing_dataset_path_is_one_line(tmp_path):
    r = _join("--set", "run.data.source=text_files", "--set", f'run.data.path="{tmp_path / "nope"}"', "--set", f'peer.cache_dir="{tmp_path}"')
    assert r.returncode == 5
    assert "is not a folder" in r.stderr.splitlines()[-1] and r.stderr.splitlines()[-1].startswith("error: ")


def test_out_of_memory_is_recognised_on_cpu_and_cuda():
    import torch

    from p2pdiloco.errors import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_checkpoint_of_another_run_config_is_one_line_naming_the_fix(tmp_path, data_cache):
    import torch

    from p2pdiloco import checkpoint

    checkpoint.save(tmp_path, dict(fingerprint="0123456789abcdef", epoch=3, params=torch.zeros(4), momentum=torch.zeros(4)))
    r = _join("--checkpoint-dir", str(tmp_path), "--set", f'peer.cache_dir="{data_cache}"')
    assert r.returncode == 6
    last = r.stderr.splitlines()[-1]
    assert last.startswith("error: ") and "belongs to another run config" in last and "--checkpoint-dir" in last, last


def test_bad_speeds_are_one_line_naming_the_fix():
    for speeds, message in [("1,fast", "comma-separated list"), ("1,0.5", "2 speeds for 3 peers"), ("1,2,0.5", "(0, 1]")]:
        proc = subprocess.run(
            [sys.executable, "-m", "p2pdiloco", "simulate", "--peers", "3", "--speeds", speeds, "--out", "/nonexistent/x"],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], proc.stderr
