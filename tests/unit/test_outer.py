import torch

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
    other.load(state.epoch, state.params.clone(), state.momentum_buffer.clone())
    assert other.state_hash == state.state_hash
