"""Ascent directions and the perturbation, on small functions with known gradients."""

from types import SimpleNamespace

import pytest
import torch

from slsam_hf.ascent import (
    GradientAscent,
    LookbackAscent,
    MomentumAscent,
    ZeroOrderAscent,
    ascent_direction,
    cosine_similarity,
    first_moment,
    first_order_direction,
    gaussian_like,
    perturb,
    restore,
    zero_order_direction,
)


def quadratic(params, a, b):
    """l(x, y) = sum(a * x^2) + sum(b * y): gradient (2 a x, b)."""
    x, y = params
    return (a * x * x).sum() + (b * y).sum()


def make_problem(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g).to(dtype).requires_grad_()
    y = torch.randn(11, generator=g).to(dtype).requires_grad_()
    a = torch.rand(7, 5, generator=g).to(dtype) + 0.5
    b = torch.randn(11, generator=g).to(dtype)
    return [x, y], a, b


def test_zero_order_direction_equals_reference():
    params, a, b = make_problem(torch.float64)
    eps = 1e-2
    direction = zero_order_direction(lambda: quadratic(params, a, b), params, num_directions=3, eps=eps, seed=42)
    g = torch.Generator().manual_seed(42)
    expected = [torch.zeros_like(p) for p in params]
    with torch.no_grad():
        for _ in range(3):
            u = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
            plus = quadratic([p + eps * ui for p, ui in zip(params, u)], a, b)
            minus = quadratic([p - eps * ui for p, ui in zip(params, u)], a, b)
            for e, ui in zip(expected, u):
                e += (plus - minus) / (2 * eps) * ui / 3
    for d, e in zip(direction, expected):
        torch.testing.assert_close(d, e, rtol=1e-9, atol=1e-12)


def test_zero_order_mean_points_along_true_gradient():
    params, a, b = make_problem(torch.float64)
    true = torch.autograd.grad(quadratic(params, a, b), params)
    direction = zero_order_direction(lambda: quadratic(params, a, b), params, num_directions=2000, eps=1e-3, seed=0)
    assert cosine_similarity(direction, list(true)) > 0.9
    single = zero_order_direction(lambda: quadratic(params, a, b), params, num_directions=1, eps=1e-3, seed=0)
    assert cosine_similarity(single, list(true)) < 0.9  # one direction alone is a poor estimate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_order_restores_weights_bit_exactly(dtype):
    params, a, b = make_problem(dtype)
    before = [p.detach().clone() for p in params]
    zero_order_direction(lambda: quadratic(params, a, b), params, num_directions=4, eps=1e-2, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def is_zero(direction):
    return all(torch.equal(d, torch.zeros_like(d)) for d in direction)


def test_zero_order_tie_gives_a_zero_direction_and_no_nan():
    params, _, _ = make_problem()
    before = [p.detach().clone() for p in params]
    assert is_zero(zero_order_direction(lambda: torch.tensor(1.0), params, num_directions=3, seed=0))
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_zero_order_non_finite_loss_gives_a_zero_direction_and_restores():
    params, a, b = make_problem()
    before = [p.detach().clone() for p in params]
    calls = iter([torch.tensor(1.0), torch.tensor(float("nan"))])
    assert is_zero(zero_order_direction(lambda: next(calls), params, seed=0))
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_gaussian_draws_follow_the_seed():
    p = torch.zeros(3, 4)
    first = gaussian_like(p, {}, 5)
    assert torch.equal(first, gaussian_like(p, {}, 5))
    assert torch.equal(first, torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))


def test_first_order_direction_is_gradient_and_leaves_grad_alone():
    params, a, b = make_problem()
    params[0].grad = torch.ones_like(params[0])
    unused = torch.zeros(3, requires_grad=True)
    direction = first_order_direction(quadratic(params, a, b), params + [unused])
    torch.testing.assert_close(direction[0], 2 * a * params[0].detach())
    torch.testing.assert_close(direction[1], b)
    assert torch.equal(direction[2], torch.zeros(3))
    assert torch.equal(params[0].grad, torch.ones_like(params[0]))


@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb_moves_by_rho_and_restore_is_exact(adaptive):
    params, a, b = make_problem()
    before = [p.detach().clone() for p in params]
    direction = [torch.randn_like(p) for p in params]
    backup, moved = perturb(params, direction, rho=0.05, adaptive=adaptive)
    assert moved
    step = [p.detach() - q for p, q in zip(params, before)]
    if adaptive:  # e = rho |w|^2 g / || |w| g ||
        norm = torch.cat([(q.abs() * d).flatten() for q, d in zip(before, direction)]).norm()
        expected = [0.05 * q.square() * d / norm for q, d in zip(before, direction)]
    else:  # e = rho g / ||g||
        norm = torch.cat([d.flatten() for d in direction]).norm()
        expected = [0.05 * d / norm for d in direction]
    for s, e in zip(step, expected):
        torch.testing.assert_close(s, e, rtol=1e-4, atol=1e-6)
    restore(params, backup)
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_perturb_does_not_move_along_a_zero_direction():
    params, _, _ = make_problem()
    before = [p.detach().clone() for p in params]
    backup = [p.detach().clone() for p in params]
    kept, moved = perturb(params, [torch.zeros_like(p) for p in params], rho=0.05, backup=backup)
    assert kept is backup and not moved
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradient_gives_no_direction(bad):
    params, _, _ = make_problem()
    source = SimpleNamespace(gradient=lambda ps: [torch.full_like(p, bad) for p in ps])
    assert GradientAscent().direction(params, source) == (params, None)


@pytest.mark.parametrize("flip", [1.0, -1.0], ids=["uphill-prior", "downhill-prior"])
def test_zero_order_along_a_prior_is_the_prior_signed_uphill(flip):
    """u = sqrt(n) m / ||m||, g = c u with c the central difference along u: +-m, with the sign of <grad, m>."""
    params, a, b = make_problem(torch.float64)
    true = torch.autograd.grad(quadratic(params, a, b), params)
    g = torch.Generator().manual_seed(3)
    prior = [flip * t + 0.5 * torch.randn(t.shape, generator=g, dtype=t.dtype) for t in true]
    eps = 1e-3
    direction = zero_order_direction(lambda: quadratic(params, a, b), params, eps=eps, prior=prior)
    n = sum(p.numel() for p in params)
    norm = torch.cat([m.flatten() for m in prior]).norm()
    u = [m * n**0.5 / norm for m in prior]
    with torch.no_grad():
        plus = quadratic([p + eps * ui for p, ui in zip(params, u)], a, b)
        minus = quadratic([p - eps * ui for p, ui in zip(params, u)], a, b)
    c = (plus - minus) / (2 * eps)
    for d, ui in zip(direction, u):
        torch.testing.assert_close(d, c * ui, rtol=1e-9, atol=1e-12)
    # The sign is that of the exact directional derivative <grad, m> (autograd), whichever way the prior points.
    exact = sum((t * m).sum() for t, m in zip(true, prior))
    assert torch.sign(c) == torch.sign(exact) == flip
    assert cosine_similarity(direction, list(true)) > 0.5


def test_zero_order_along_a_zero_prior_gives_a_zero_direction():
    params, a, b = make_problem()
    before = [p.detach().clone() for p in params]
    prior = [torch.zeros_like(p) for p in params]
    assert is_zero(zero_order_direction(lambda: quadratic(params, a, b), params, prior=prior))
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_order_along_a_prior_restores_weights_bit_exactly(dtype):
    params, a, b = make_problem(dtype)
    before = [p.detach().clone() for p in params]
    prior = [torch.randn_like(p, dtype=torch.float32) for p in params]
    assert not is_zero(zero_order_direction(lambda: quadratic(params, a, b), params, eps=0.1, prior=prior))
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("optimizer_cls, key", [(torch.optim.AdamW, "exp_avg"), (torch.optim.SGD, "momentum_buffer")])
def test_first_moment_is_the_optimizers_state_or_none(optimizer_cls, key):
    params, a, b = make_problem()
    stepped, never = params
    kwargs = {"momentum": 0.9} if optimizer_cls is torch.optim.SGD else {}
    optimizer = optimizer_cls(params, lr=0.1, **kwargs)
    for _ in range(2):
        stepped.grad = 2 * a * stepped.detach()  # only x steps; y never gets a gradient
        optimizer.step()
    moments = first_moment(optimizer.state, params)
    assert moments[0] is optimizer.state[stepped][key] and moments[1] is None
    # AdamW: m = b1 (1 - b1) g1 + (1 - b1) g2; SGD: buf = 0.9 g1 + g2 (g recomputed by hand at each step)
    assert moments[0].abs().sum() > 0


class QuadraticSource:
    """An `AscentSource` over the quadratic: x has optimizer state and a previous gradient, y has neither."""

    seed = 5

    def __init__(self, params, a, b):
        self.params, self.a, self.b = params, a, b
        g = torch.Generator().manual_seed(1)
        self.moment = {params[0]: torch.randn(params[0].shape, generator=g)}
        self.previous = {params[0]: torch.randn(params[0].shape, generator=g)}

    def gradient(self, params):
        return list(torch.autograd.grad(quadratic(self.params, self.a, self.b), params))

    def loss(self):
        return quadratic(self.params, self.a, self.b)

    def first_moment(self, params):
        return [self.moment.get(p) for p in params]

    def previous_gradient(self, params):
        return [self.previous.get(p) for p in params]

    def backup(self, params):
        return [p.detach().clone() for p in params]


def test_direction_objects_use_what_each_mode_knows():
    params, a, b = make_problem()
    x, y = params
    source = QuadraticSource(params, a, b)
    covered, g = GradientAscent().direction(params, source)
    assert covered == params and torch.allclose(g[0], 2 * a * x) and torch.allclose(g[1], b)
    # Lookback and MSAM cover only x (the tensor with a previous gradient / a first moment).
    covered, g = LookbackAscent().direction(params, source)
    assert covered == [x] and torch.equal(g[0], source.previous[x])
    covered, g = MomentumAscent().direction(params, source)
    assert covered == [x] and torch.equal(g[0], -source.moment[x])
    # The momentum-guided probe is zero_order_direction along m on x; the Gaussian one draws over both tensors.
    covered, g = ZeroOrderAscent(eps=1e-2, along_momentum=True).direction(params, source)
    expected = zero_order_direction(source.loss, [x], eps=1e-2, seed=5, prior=[source.moment[x]])
    assert covered == [x] and torch.equal(g[0], expected[0])
    covered, g = ZeroOrderAscent(num_directions=2, eps=1e-2).direction(params, source)
    expected = zero_order_direction(source.loss, params, num_directions=2, eps=1e-2, seed=5)
    assert covered == params and all(torch.equal(u, v) for u, v in zip(g, expected))


def test_directions_without_state_give_no_perturbation():
    params, a, b = make_problem()
    source = QuadraticSource(params, a, b)
    source.moment, source.previous = {}, {}
    for direction in (LookbackAscent(), MomentumAscent(), ZeroOrderAscent(along_momentum=True)):
        covered, g = direction.direction(params, source)
        assert covered == params and g is None


@pytest.mark.parametrize(("mode", "cls", "adaptive"), [("sam", GradientAscent, False), ("asam", GradientAscent, True),
                                                      ("zo", ZeroOrderAscent, False), ("msam", MomentumAscent, False),
                                                      ("lookback", LookbackAscent, False)])
def test_ascent_direction_builds_each_mode(mode, cls, adaptive):
    direction = ascent_direction(mode, "momentum", 1, 1e-2)
    assert type(direction) is cls and direction.adaptive == adaptive
    assert direction.first_order == (mode in ("sam", "asam"))
    if mode == "zo":
        assert direction.along_momentum and direction.eps == 1e-2


def test_ascent_direction_of_none_and_of_bad_values():
    assert ascent_direction("none") is None
    with pytest.raises(ValueError, match="sam_mode must be one of"):
        ascent_direction("adam")
    with pytest.raises(ValueError, match="zo_direction must be one of"):
        ascent_direction("zo", "uniform")
