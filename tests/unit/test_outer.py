import pytest
import torch

from p2pdiloco.errors import StateDownloadFailed

from p2pdiloco.outer import OuterState, flatten_parameters, load_flat_parameters


def _deltas(n=5, size=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=gen) * 1e-2 for _ in range(n)]


def test_nesterov_matches_torch_sgd():
    theta0 = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    state = OuterState(theta0, optimizer="nesterov", lr=0.7, momentum=0.9)
    ref = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    for delta in _deltas():
        state.step(delta)
        ref.grad = delta.clone()
        opt.step()
        torch.testing.assert_close(state.params, ref.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(state.momentum_buffer, opt.state[ref]["momentum_buffer"], rtol=0, atol=1e-6)
    assert state.epoch == 5


def test_sgd_outer_is_plain_averaging_step():
    theta0 = torch.zeros(10)
    state = OuterState(theta0, optimizer="sgd", lr=1.0, momentum=0.9)
    delta = torch.ones(10)
    state.step(delta)
    torch.testing.assert_close(state.params, -torch.ones(10))


def test_pseudo_gradient_sign_points_like_a_gradient():
    # A descent step moves local params along -g; the pseudo-gradient must be +g so the outer
    # SGD step (params -= lr * delta) moves the global params the same way the inner phase did.
    theta = torch.zeros(4)
    g = torch.tensor([1.0, -2.0, 3.0, 0.5])
    local = theta - 0.1 * g
    state = OuterState(theta, optimizer="sgd", lr=1.0, momentum=0.0)
    delta = state.pseudo_gradient(local)
    torch.testing.assert_close(delta, 0.1 * g)
    state.step(delta)
    torch.testing.assert_close(state.params, local)


def test_digest_changes_with_any_part_of_the_state():
    state = OuterState(torch.zeros(8), optimizer="nesterov", lr=0.7, momentum=0.9)
    first = state.digest()
    assert OuterState(torch.zeros(8), optimizer="nesterov", lr=0.7, momentum=0.9).digest() == first
    state.momentum_buffer[3] = 1e-30
    assert state.digest() != first
    state.momentum_buffer.zero_()
    state.epoch = 1
    assert state.digest() != first


def test_flat_parameters_round_trip_with_tied_weights():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied: counted once
    flat = flatten_parameters(model)
    assert flat.numel() == 40
    load_flat_parameters(model, flat * 2)
    torch.testing.assert_close(flatten_parameters(model), flat * 2)


def test_state_hash_is_the_digest_and_follows_step_and_load():
    state = OuterState(torch.zeros(8), optimizer="nesterov", lr=0.7, momentum=0.9)
    assert state.state_hash == state.digest()
    state.step(torch.ones(8))
    assert state.state_hash == state.digest()
    other = OuterState(torch.zeros(8), optimizer="nesterov", lr=0.7, momentum=0.9)
    other.load(state.epoch, [state.params.clone(), state.momentum_buffer.clone()])
    assert other.state_hash == state.state_hash


@pytest.mark.parametrize("n", [1, 3, 4])
def test_delayed_nesterov_with_equal_contributions_is_nesterov_bit_for_bit(n):
    # Every round brings N contributions (homogeneous peers, all in every round): DN must be
    # DiLoCo's Nesterov exactly, so turning it on costs a synchronous swarm nothing.
    theta0 = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    dn = OuterState(theta0, optimizer="delayed_nesterov", lr=0.7, momentum=0.9, delay=n)
    ref = OuterState(theta0, optimizer="nesterov", lr=0.7, momentum=0.9)
    for delta in _deltas(8):
        dn.step(delta, contributions=n)
        ref.step(delta, contributions=n)
        assert torch.equal(dn.params, ref.params) and torch.equal(dn.momentum_buffer, ref.momentum_buffer)
        assert dn.pending == 0 and not dn.buffer.any()


def test_delayed_nesterov_follows_algorithm_3_arrival_by_arrival():
    # The paper's rule (c = 0), written out per single arrival, against ours with k = 1.
    n, lr, mu = 3, 0.5, 0.8
    theta = torch.randn(50, generator=torch.Generator().manual_seed(3))
    m, acc = torch.zeros(50), torch.zeros(50)
    state = OuterState(theta, optimizer="delayed_nesterov", lr=lr, momentum=mu, delay=n)
    for t, g in enumerate(_deltas(7, size=50)):
        acc += g
        if (t + 1) % n == 0:
            m = mu * m + acc / n
            theta = theta - lr * (mu * m + g / n)
            acc = torch.zeros(50)
        else:
            theta = theta - lr * (g / n)
        state.step(g, contributions=1)
        torch.testing.assert_close(state.params, theta, rtol=0, atol=1e-6)
        torch.testing.assert_close(state.momentum_buffer, m, rtol=0, atol=1e-6)
    assert state.pending == 7 % n


def test_delayed_nesterov_one_window_is_one_nesterov_step_on_its_contributions():
    # Two partial rounds (2 + 2 contributions, N = 4) move theta as one Nesterov step on the
    # mean of the window: the momentum is updated once, not twice.
    d1, d2 = _deltas(2, size=20)
    dn = OuterState(torch.zeros(20), optimizer="delayed_nesterov", lr=0.7, momentum=0.9, delay=4)
    dn.step(d1, contributions=2)
    assert dn.pending == 2 and not dn.momentum_buffer.any()
    dn.step(d2, contributions=2)
    window = (d1 + d2) / 2
    torch.testing.assert_close(dn.momentum_buffer, window, rtol=0, atol=1e-7)
    torch.testing.assert_close(dn.params, -0.7 * (window + 0.9 * window), rtol=0, atol=1e-6)


def test_slowmo_is_heavy_ball_on_the_pseudo_gradient():
    state = OuterState(torch.zeros(5), optimizer="slowmo", lr=1.0, momentum=0.5)
    ref = torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.SGD([ref], lr=1.0, momentum=0.5, dampening=0.0)
    for delta in _deltas(4, size=5):
        state.step(delta)
        ref.grad = delta.clone()
        opt.step()
        torch.testing.assert_close(state.params, ref.detach(), rtol=0, atol=1e-6)


def test_delayed_nesterov_state_travels_whole_and_checked():
    src = OuterState(torch.zeros(8), optimizer="delayed_nesterov", lr=0.7, momentum=0.9, delay=4)
    src.step(torch.ones(8), contributions=1)
    dst = OuterState(torch.zeros(8), optimizer="delayed_nesterov", lr=0.7, momentum=0.9, delay=4)
    meta = src.meta()
    dst.load(meta["epoch"], [t.clone() for t in src.tensors()], expected_hash=meta["state_hash"], pending=meta["pending"])
    assert dst.state_hash == src.state_hash and dst.pending == 1
    restored = OuterState(torch.zeros(8), optimizer="delayed_nesterov", lr=0.7, momentum=0.9, delay=4)
    restored.load_checkpoint(src.checkpoint_fields())
    assert restored.state_hash == src.state_hash
    with pytest.raises(StateDownloadFailed, match="digest"):  # the pending count is part of the digest
        dst.load(meta["epoch"], [t.clone() for t in src.tensors()], expected_hash=meta["state_hash"], pending=2)
    with pytest.raises(StateDownloadFailed, match="has 2 tensors, expected 3"):
        dst.load(meta["epoch"], src.tensors()[:2])
    with pytest.raises(StateDownloadFailed, match="pending"):
        dst.load(meta["epoch"], src.tensors(), pending=4)
