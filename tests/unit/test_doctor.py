"""``p2pdiloco doctor``: the estimates it checks against, and the checks that need no network."""

import json
import socket
import subprocess
import sys

import pytest

from p2pdiloco import doctor
from p2pdiloco.config import CONFIGS_DIR, ModelConfig, load_recipe


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS_DIR.glob("*.toml")))
def test_parameter_count_matches_the_model_of_every_recipe(name):
    import torch
    from transformers import LlamaForCausalLM

    from p2pdiloco.model import llama_config

    cfg = load_recipe(name).run.model
    with torch.device("meta"):  # no memory: the 1B recipe too
        model = LlamaForCausalLM(llama_config(cfg))
    assert doctor.count_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_parameter_count_untied_with_grouped_query_attention():
    import torch
    from transformers import LlamaForCausalLM

    from p2pdiloco.model import llama_config

    cfg = ModelConfig(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=96, vocab_size=300,
                      tie_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(cfg))
    assert doctor.count_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_estimate_grows_with_the_recipe_and_puts_training_on_the_device():
    small, big = load_recipe("test"), load_recipe("c4-150m")
    s = doctor.estimate(small, on_gpu=False, bf16=False, data_cached=True)
    b = doctor.estimate(big, on_gpu=True, bf16=True, data_cached=False)
    assert s.params < 1e6 < 1e8 < b.params
    assert b.terms["training"] == 16 * b.params and b.device_bytes > b.terms["training"]
    on_cpu = doctor.estimate(big, on_gpu=False, bf16=True, data_cached=False)
    assert on_cpu.host_bytes - b.host_bytes == pytest.approx(b.device_bytes)  # on CPU, RAM holds the training share too
    assert b.host_bytes > b.terms["outer_state"] + b.terms["round_buffers"]
    assert s.disk_bytes == 0 and b.disk_bytes > 0


def test_checks_of_this_machine_for_the_test_recipe_pass():
    checks = doctor.run_checks(load_recipe("test"))
    names = {c.name for c in checks}
    assert {"python", "torch", "bitsandbytes", "numpy", "hivemind", "p2pd", "ram", "disk", "port"} <= names
    assert not [c for c in checks if c.status == doctor.FAIL], [c for c in checks if c.status == doctor.FAIL]


def test_a_port_in_use_fails_with_the_fix():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check = doctor.check_port("127.0.0.1", s.getsockname()[1])
    assert check.status == doctor.FAIL and "another --port" in check.fix


def test_a_random_public_port_is_a_warning():
    check = doctor.check_port("0.0.0.0", 0)
    assert check.status == doctor.WARN and "--port" in check.fix


def test_numpy_from_2_4_fails(monkeypatch):
    import numpy

    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    check = doctor.check_numpy()
    assert check.status == doctor.FAIL and "numpy<2.4" in check.fix


def test_too_little_ram_fails(monkeypatch):
    monkeypatch.setattr(doctor, "_mem_available", lambda: 10**8)
    checks = doctor.check_resources(load_recipe("c4-150m"), dict(on_gpu=False, bf16=False, gpu_total=None))
    ram = next(c for c in checks if c.name == "ram")
    assert ram.status == doctor.FAIL and "needed" in ram.detail


def test_a_crashing_check_is_reported_not_raised():
    def broken():
        raise RuntimeError("boom")

    (check,) = doctor._guard("x", broken)
    assert check.status == doctor.FAIL and "boom" in check.detail


def test_cli_json_report_and_exit_code():
    r = subprocess.run([sys.executable, "-m", "p2pdiloco", "doctor", "test", "--json"], capture_output=True, text=True, timeout=300)
    report = json.loads(r.stdout)
    assert r.returncode == (0 if report["ok"] else 1)
    assert all(set(c) >= {"name", "status", "detail", "fix"} for c in report["checks"])


def test_cli_fails_when_a_check_fails(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = subprocess.run([sys.executable, "-m", "p2pdiloco", "doctor", "test", "--port", str(s.getsockname()[1])],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "fail" in r.stdout
