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


def _join(*args):
    return subprocess.run([sys.executable, "-m", "p2pdiloco", "join", "test", *args], capture_output=True, text=True, timeout=120)


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
