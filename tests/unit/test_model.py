import pytest
import torch
from transformers import AutoModelForCausalLM

from p2pdiloco.config import ModelConfig, PeerConfig, load_recipe
from p2pdiloco.errors import ConfigError
from p2pdiloco.model import build_model, count_parameters, evaluate, parameter_digest, resolve_device, resolve_devices, use_bf16

# parameter_digest of the test recipe's initial model. It must be the same on every machine and
# torch build: a change here means peers with different setups would start from different weights.
TEST_RECIPE_INIT_DIGEST = "532b29c6"


def test_build_is_deterministic_and_leaves_global_rng_alone(test_recipe):
    rng_before = torch.get_rng_state()
    a = build_model(test_recipe.run.model).state_dict()
    b = build_model(test_recipe.run.model).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in a.values() if v.is_floating_point())
    other = build_model(test_recipe.run.model.model_copy(update={"init_seed": 1})).state_dict()
    assert not torch.equal(other["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_initial_weights_match_the_recorded_digest(test_recipe):
    assert parameter_digest(build_model(test_recipe.run.model)) == TEST_RECIPE_INIT_DIGEST


def test_init_statistics(test_recipe):
    model = build_model(test_recipe.run.model)
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            assert abs(param.mean().item()) < 2e-3 and 0.018 < param.std().item() < 0.022, name
            assert param.abs().max().item() <= 0.02 * 3.47, name  # Irwin-Hall(4) is bounded
        else:
            assert torch.all(param == 1.0), name  # RMSNorm weights


def test_tiny_cpu_has_about_4_2m_parameters_tied_once():
    model = build_model(load_recipe("tiny-cpu").run.model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    n = count_parameters(model)
    assert 4.1e6 < n < 4.3e6
    assert n == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    untied = build_model(load_recipe("tiny-cpu", ["run.model.tie_embeddings=false"]).run.model)
    assert count_parameters(untied) == n + 4096 * 256


def test_kv_heads_and_positions_follow_the_config():
    cfg = ModelConfig(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=96,
                      vocab_size=128, max_seq_len=48)
    model = build_model(cfg)
    assert model.config.num_key_value_heads == 2 and model.config.max_position_embeddings == 48
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)


def test_save_pretrained_round_trip_gives_identical_logits(tmp_path, test_recipe):
    model = build_model(test_recipe.run.model).eval()
    batch = torch.randint(0, test_recipe.run.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch).logits, loaded(input_ids=batch).logits)


def test_evaluate_is_mean_loss_and_restores_train_mode(test_recipe):
    model = build_model(test_recipe.run.model)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (4, 16), generator=gen) for _ in range(3)]
    loss = evaluate(model, batches, torch.device("cpu"), bf16=False)
    assert model.training
    with torch.no_grad():
        expected = sum(model(input_ids=b, labels=b).loss.item() for b in batches) / 3
    assert loss == pytest.approx(expected, rel=1e-6)
    assert loss == pytest.approx(torch.log(torch.tensor(512.0)).item(), abs=0.2)  # untrained: near uniform
    assert evaluate(model, batches, torch.device("cpu"), False, micro_batch_size=1) == pytest.approx(loss, rel=1e-5)


def test_device_and_bf16_choice():
    assert resolve_device(PeerConfig(devices="cpu")) == torch.device("cpu")
    cpu = torch.device("cpu")
    assert use_bf16(PeerConfig(), cpu) is False
    assert use_bf16(PeerConfig(bf16=True), cpu) is True
    if not torch.cuda.is_available():
        assert resolve_device(PeerConfig(devices="auto")) == cpu
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device(PeerConfig(devices="cuda"))
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device(PeerConfig(devices="gpu0"))


def test_devices_name_one_worker_each_and_bad_names_get_the_fix():
    cpu = torch.device("cpu")
    assert resolve_devices(PeerConfig(devices="cpu:3")) == [cpu] * 3
    if not torch.cuda.is_available():
        assert resolve_devices(PeerConfig()) == [cpu]  # all: every GPU, else the CPU
    for bad, message in [("cpu:0", "from 1 to 64"), ("cpu:x", "from 1 to 64"), ("tpu", "not a device"),
                         ("cpu,cpu", "name each GPU once")]:
        with pytest.raises(ConfigError, match=message):
            resolve_devices(PeerConfig(devices=bad))


def test_the_old_device_key_is_named_with_its_new_name():
    from p2pdiloco.config import load_recipe

    with pytest.raises(ConfigError, match="'peer.device' is now 'peer.devices'"):
        load_recipe("test", ["peer.device=cpu"])
