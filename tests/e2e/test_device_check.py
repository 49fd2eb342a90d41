"""bench/device_check.py, the one-shot GPU check, in its --cpu-smoke form: a tiny version of every
part (inner loop, codecs, a 2-peer simulate) runs on CPU and writes well-formed figures.

e2e, not unit: part 3 starts a coordinator and two real peers (about 40 s on 2 cores)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_smoke_runs_every_part_and_writes_its_figures(tmp_path, data_cache):
    out = tmp_path / "dc"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "device_check.py"), "--cpu-smoke", "--out", str(out),
                        "--cache-dir", str(data_cache)],
                       cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    assert report["ok"] is True and report["cpu_smoke"] is True and report["env"]["torch"]
    inner, codecs, sim = (report["parts"][k] for k in ("inner", "codecs", "simulate"))
    assert not any("error" in part for part in (inner, codecs, sim))
    assert inner["tokens_per_s"] > 0 and inner["s_per_step"] > 0 and math.isfinite(inner["loss_last"])
    assert inner["mfu"] is None and inner["params"] > 0  # no peak FLOPs on CPU
    for name, bound, size in (("blockwise8", 0.1, 1.01), ("4bit", 0.3, 0.52)):
        c = codecs[name]
        assert 0 < c["rel_error"] < bound, (name, c)
        assert c["encode_gbps_cpu"] > 0 and c["decode_gbps"] > 0 and c["bytes_per_value"] < size, (name, c)
    assert sim["consistent"] is True and sim["epochs_completed"] == 1 and sim["peer_epochs"] == [1, 1]
    assert sim["swarm_tokens_per_s"] > 0 and sim["bytes_sent_per_round"] > 0
    assert "part 1 failed" not in r.stdout and "every part ran" in r.stdout
