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
) -> list[torch.Tensor] | None:
    """Two-point Gaussian estimate of the gradient from forwards only (ZO-SAM):

        g = 1/m * sum_k c_k u_k,   c_k = (l(theta + eps u_k) - l(theta - eps u_k)) / (2 eps),   u_k ~ N(0, I).

    `loss_fn()` evaluates the loss at the current parameters (called under no_grad). The parameters are
    restored bit-exactly (copied back). Returns None when every c_k is 0 (a tie) or a loss is not finite: no
    perturbation this step. The u_k come from private generators seeded with `seed` (one per device).
    """
    generators = {}
    backup = [p.detach().clone() for p in params]
    estimate = None
    try:
        for _ in range(num_directions):
            u = [gaussian_like(p, generators, seed) for p in params]
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
