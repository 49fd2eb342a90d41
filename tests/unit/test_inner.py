import copy
import math

import pytest
import torch

from p2pdiloco.config import InnerConfig
from p2pdiloco.data import TokenStream
from p2pdiloco.inner import InnerOptimizer, lr_at
from p2pdiloco.model import build_model, evaluate

CPU = torch.device("cpu")


def test_lr_schedule_warmup_cosine_floor():
    cfg = InnerConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)  # warmup counts from 1: no step at lr 0
    assert lr_at(cfg, 4) == pytest.approx(0.5)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(cfg, 60) == pytest.approx(0.55)  # half-way: the mean of peak and floor
    assert lr_at(cfg, 35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(cfg, 110) == pytest.approx(0.1)
    assert lr_at(cfg, 10_000) == pytest.approx(0.1)  # constant after total_steps
    decay = [lr_at(cfg, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(InnerConfig(lr=2e-3, warmup_steps=0, total_steps=100), 0) == pytest.approx(2e-3)


def test_optimizer_uses_the_global_step_and_decay_groups(test_recipe):
    model = build_model(test_recipe.run.model)
    inner = InnerOptimizer(model, test_recipe.run.inner, CPU, bf16=False)
    assert inner.lr_at(1234) == lr_at(test_recipe.run.inner, 1234)
    decayed, plain = inner.optimizer.param_groups
    assert decayed["weight_decay"] == test_recipe.run.inner.weight_decay and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    batch = torch.randint(0, 512, (4, 16))
    inner.step(batch, global_step=2)
    assert all(g["lr"] == pytest.approx(lr_at(test_recipe.run.inner, 2)) for g in inner.optimizer.param_groups)


def test_loss_decreases_over_30_steps(test_recipe, data_cache):
    run = test_recipe.run
    model = build_model(run.model)
    inner = InnerOptimizer(model, run.inner, CPU, bf16=False, micro_batch_size=None)
    stream = TokenStream(run.data, run.model.vocab_size, data_cache, "peer-a", run.seed)
    val = stream.val_batches()
    before = evaluate(model, val, CPU, bf16=False)
    losses = [inner.step(stream.next_batch(), step) for step in range(30)]
    assert all(isinstance(x, float) and math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.8
    assert evaluate(model, val, CPU, bf16=False) < before - 0.8


def _grads_of_one_step(model, cfg, batch, micro):
    inner = InnerOptimizer(model, cfg, CPU, bf16=False, micro_batch_size=micro)
    captured = {}

    def capture():  # stands in for the AdamW step: keep the (clipped) gradients
        captured["grads"] = [p.grad.clone() for p in inner.params]

    inner.optimizer.step = capture
    loss = inner.step(batch, global_step=0)
    return loss, captured["grads"], inner.last_grad_norm


def test_micro_batches_give_the_full_batch_gradients(test_recipe):
    cfg = test_recipe.run.inner.model_copy(update={"grad_clip": 1e9})  # compare raw gradients
    model = build_model(test_recipe.run.model)
    batch = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    full_loss, full, full_norm = _grads_of_one_step(copy.deepcopy(model), cfg, batch, None)
    for micro in (1, 3):  # 3 leaves a short last chunk: rows are weighted, not chunks
        loss, grads, norm = _grads_of_one_step(copy.deepcopy(model), cfg, batch, micro)
        assert loss == pytest.approx(full_loss, rel=1e-6)
        assert norm.item() == pytest.approx(full_norm.item(), rel=1e-5)
        for a, b in zip(grads, full):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    reference = copy.deepcopy(model)
    reference(input_ids=batch, labels=batch).loss.backward()
    for a, p in zip(full, reference.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-8)


def test_gradients_are_clipped_and_zeroed_in_place(test_recipe):
    cfg = test_recipe.run.inner.model_copy(update={"grad_clip": 1e-3})
    model = build_model(test_recipe.run.model)
    batch = torch.randint(0, 512, (4, 16))
    _, grads, norm = _grads_of_one_step(model, cfg, batch, None)
    assert norm.item() > 1e-3
    assert torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).item() == pytest.approx(1e-3, rel=1e-3)
    inner = InnerOptimizer(model, cfg, CPU, bf16=False)
    inner.step(batch, 0)
    buffers = [p.grad for p in inner.params]
    inner.step(batch, 1)
    assert all(p.grad is b and not b.any() for p, b in zip(inner.params, buffers))


def test_state_dict_round_trip_continues_identically(test_recipe):
    run = test_recipe.run
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (4, 16), generator=gen) for _ in range(6)]
    model = build_model(run.model)
    inner = InnerOptimizer(model, run.inner, CPU, bf16=False)
    for i in range(3):
        inner.step(batches[i], i)
    twin = copy.deepcopy(model)
    twin_inner = InnerOptimizer(twin, run.inner, CPU, bf16=False)
    twin_inner.load_state_dict(copy.deepcopy(inner.state_dict()))
    for i in range(3, 6):
        assert inner.step(batches[i], i) == twin_inner.step(batches[i], i)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_bf16_autocast_step_on_cpu(test_recipe):
    model = build_model(test_recipe.run.model)
    inner = InnerOptimizer(model, test_recipe.run.inner, CPU, bf16=True, micro_batch_size=2)
    loss = inner.step(torch.randint(0, 512, (4, 16)), 0)
    assert math.isfinite(loss) and abs(loss - math.log(512)) < 0.5
    assert all(p.dtype == torch.float32 for p in model.parameters())
