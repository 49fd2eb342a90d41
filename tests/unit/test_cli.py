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
