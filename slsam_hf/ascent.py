"""Ascent directions and the SAM perturbation (pure torch; knows nothing of Trainer).

All functions act on a list of parameter tensors: the arms selected this step. Norms are taken over that list
only.
"""

import math
from collections.abc import Callable

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
