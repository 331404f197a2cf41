"""Ascent directions and the SAM perturbation (pure torch; knows nothing of Trainer).

All functions act on a list of parameter tensors: the arms selected this step. Norms are taken over that list
only.
"""

import math
from collections.abc import Callable
from typing import Protocol

import torch


def first_order_direction(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """g = d loss / d params (SAM's ascent backward), without touching `.grad`; zeros for unused params."""
    return list(torch.autograd.grad(loss, params, materialize_grads=True))


@torch.no_grad()
def zero_order_direction(
    loss_fn: Callable[[], torch.Tensor],
    params: list[torch.Tensor],
    num_directions: int = 1,
    eps: float = 1e-3,
    seed: int = 0,
    prior: list[torch.Tensor] | None = None,
) -> list[torch.Tensor] | None:
    """Two-point estimate of the gradient from forwards only:

        g = 1/m * sum_k c_k u_k,   c_k = (l(theta + eps u_k) - l(theta - eps u_k)) / (2 eps).

    Without `prior`, u_k ~ N(0, I) (ZO-SAM), drawn from private generators seeded with `seed` (one per device).
    With `prior` (one tensor per param, e.g. the optimizer's first moment), there is one direction
    u = sqrt(n) * prior / ||prior|| (n elements: a Gaussian's norm, so `eps` means the same per coordinate), and
    g = c u points along +-prior, uphill: the probe only picks the sign.

    `loss_fn()` evaluates the loss at the current parameters (called under no_grad). The parameters are
    restored bit-exactly (copied back). Returns None when every c_k is 0 (a tie), a loss is not finite or the prior
    is zero: no perturbation this step.
    """
    if prior is not None:
        norm = grad_norm(prior)
        if not torch.isfinite(norm) or norm == 0:
            return None
        n = sum(p.numel() for p in params)
        prior_direction = torch._foreach_mul([m.to(p.dtype) for p, m in zip(params, prior)], float(n**0.5 / norm))
        num_directions = 1
    generators = {}
    backup = [p.detach().clone() for p in params]
    estimate = None
    try:
        for _ in range(num_directions):
            u = prior_direction if prior is not None else [gaussian_like(p, generators, seed) for p in params]
            torch._foreach_add_(params, u, alpha=eps)
            loss_plus = loss_fn()
            torch._foreach_add_(params, u, alpha=-2 * eps)
            loss_minus = loss_fn()
            torch._foreach_copy_(params, backup)
            c = float((loss_plus.double() - loss_minus.double()) / (2 * eps))
            if not math.isfinite(c):
                return None
            if c == 0:
                continue
            torch._foreach_mul_(u, c / num_directions)
            estimate = u if estimate is None else torch._foreach_add(estimate, u)
    finally:
        torch._foreach_copy_(params, backup)
    return estimate


def first_moment(optimizer_state: dict, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """m of each tensor in the base optimizer's state: AdamW/Adam `exp_avg`, SGD `momentum_buffer`; None where the
    optimizer holds no such state yet (a tensor never stepped)."""
    moments = []
    for p in params:
        state = optimizer_state.get(p, {})
        moments.append(state.get("exp_avg", state.get("momentum_buffer")))
    return moments


def gaussian_like(param: torch.Tensor, generators: dict, seed: int) -> torch.Tensor:
    """u ~ N(0, I) shaped like `param`, drawn from the generator of its device (created with `seed`)."""
    if param.device not in generators:
        generators[param.device] = torch.Generator(param.device).manual_seed(seed)
    return torch.randn(param.shape, generator=generators[param.device], device=param.device, dtype=param.dtype)


def tensor_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """||t||_2 of each tensor, stacked, in at least float32."""
    return torch.stack([torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32))
                        for t in tensors])


def grad_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """||tensors||_2 over the whole list, accumulated in at least float32."""
    return torch.linalg.vector_norm(tensor_norms(tensors))


@torch.no_grad()
def perturb(
    params: list[torch.Tensor], direction: list[torch.Tensor], rho: float, adaptive: bool = False
) -> list[torch.Tensor] | None:
    """theta <- theta + e with e = rho * T^2 g / ||T g||, T = |theta| for ASAM (`adaptive`), else the identity.

    Returns a copy of the unperturbed parameters for `restore`, or None (nothing moved) when ||T g|| is 0 or not
    finite, e.g. an fp16 overflow in the ascent gradient.
    """
    scaled = [g * p.abs() for p, g in zip(params, direction)] if adaptive else direction
    norm = grad_norm(scaled)
    if not torch.isfinite(norm) or norm == 0:
        return None
    backup = [p.detach().clone() for p in params]
    scale = rho / norm
    for p, g in zip(params, scaled):
        step = g * p.abs() * scale if adaptive else g * scale
        p.add_(step.to(p.dtype))
    return backup


@torch.no_grad()
def restore(params: list[torch.Tensor], backup: list[torch.Tensor]) -> None:
    """theta <- the copy `perturb` kept: exact, also for bf16/fp16 weights."""
    torch._foreach_copy_(params, backup)


def cosine_similarity(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """cos(a, b) of two directions given as tensor lists."""
    dot = sum((x.float() * y.float()).sum() for x, y in zip(a, b))
    return float(dot / (grad_norm(a) * grad_norm(b)).clamp_min(1e-30))


# ------------------------------------------------------------------ one object per ascent direction (sam_mode)


class AscentSource(Protocol):
    """What a direction may ask about the current micro-batch (the trainer answers)."""

    seed: int  # seed of this micro-batch's private draws

    def gradient(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """d loss / d params at theta (one backward pass)."""

    def loss(self) -> torch.Tensor:
        """The loss at the current parameters, no grad (a zero-order probe)."""

    def first_moment(self, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The base optimizer's first moment m of each tensor (None: no state yet)."""

    def previous_gradient(self, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each tensor's update gradient of the previous step (None: not known)."""


def known(params: list[torch.Tensor], directions: list[torch.Tensor | None]) -> tuple[list, list | None]:
    """The params whose direction is known (not None) and those directions; (params, None) when none is."""
    pairs = [(p, d) for p, d in zip(params, directions) if d is not None]
    if not pairs:
        return params, None
    return [p for p, _ in pairs], [d for _, d in pairs]


class AscentDirection:
    """How one `sam_mode` finds the ascent direction g on the selected tensors.

    `direction(params, source)` returns (the tensors g covers, g), or (params, None): no perturbation this
    micro-batch. `adaptive`: perturb by ASAM's rule. `first_order`: g is the loss gradient at theta (its norms can
    reward the bandit).
    """

    adaptive = False
    first_order = False

    def direction(self, params: list[torch.Tensor], source: AscentSource) -> tuple[list, list | None]:
        raise NotImplementedError


class GradientAscent(AscentDirection):
    """SAM: g = dL/dtheta (one extra backward); ASAM with `adaptive`."""

    first_order = True

    def __init__(self, adaptive: bool = False):
        self.adaptive = adaptive

    def direction(self, params, source):
        return params, source.gradient(params)


class LookbackAscent(AscentDirection):
    """g = the previous step's update gradient, on the tensors that have one (no extra pass)."""

    def direction(self, params, source):
        return known(params, source.previous_gradient(params))


class MomentumAscent(AscentDirection):
    """MSAM (arXiv 2401.12033): g = -m, the base optimizer's first moment negated (no extra pass)."""

    def direction(self, params, source):
        params, m = known(params, source.first_moment(params))
        return params, None if m is None else torch._foreach_neg(m)


class ZeroOrderAscent(AscentDirection):
    """ZO-SAM: the two-point estimate along m Gaussian directions (`zero_order_direction`), or along the base
    optimizer's first moment (`along_momentum`: g = sign(c) * m-direction, on the tensors that have one)."""

    def __init__(self, num_directions: int = 1, eps: float = 1e-3, along_momentum: bool = False):
        self.num_directions, self.eps, self.along_momentum = num_directions, eps, along_momentum

    def direction(self, params, source):
        prior = None
        if self.along_momentum:
            params, prior = known(params, source.first_moment(params))
            if prior is None:
                return params, None
        return params, zero_order_direction(source.loss, params, self.num_directions, self.eps, source.seed, prior)


def ascent_direction(sam_mode: str, zo_direction: str = "gaussian", zo_num_directions: int = 1,
                     zo_eps: float = 1e-3) -> AscentDirection | None:
    """The direction object of a `sam_mode` ('none': None)."""
    if sam_mode == "none":
        return None
    if sam_mode in ("sam", "asam"):
        return GradientAscent(adaptive=sam_mode == "asam")
    if sam_mode == "lookback":
        return LookbackAscent()
    if sam_mode == "msam":
        return MomentumAscent()
    if sam_mode == "zo":
        if zo_direction not in ("gaussian", "momentum"):
            raise ValueError(f"zo_direction must be one of ['gaussian', 'momentum'], got {zo_direction!r}")
        return ZeroOrderAscent(zo_num_directions, zo_eps, along_momentum=zo_direction == "momentum")
    raise ValueError(f"sam_mode must be one of ['none', 'sam', 'asam', 'zo', 'msam', 'lookback'], got {sam_mode!r}")
