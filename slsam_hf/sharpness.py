"""How sharp the loss is around a model's weights: the quantities SAM is meant to lower, measured directly.

With L(θ) the mean of the model's loss over `batches` and θ the parameters that require grad (for a PEFT model, the
adapters):

    ascent_sharpness       = L(θ + ρ g/‖g‖) − L(θ),            g = ∇L(θ)          (what SAM minimizes, first order)
    random_sharpness       = mean_u L(θ + ρ u/‖u‖) − L(θ),      u ~ N(0, I)        (flatness in a random direction)
    hessian_top_eigenvalue = λ_max(∇²L(θ)), power iteration on Hessian-vector products  (curvature)

Pure torch: no Trainer inside. The model is evaluated in eval mode (no dropout) and left exactly as it was found:
the same weights bit for bit, the same train/eval flag per module, its `.grad` untouched.
"""

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .ascent import grad_norm


def measure_sharpness(
    model: nn.Module, batches, rho: float = 0.05, num_directions: int = 8, hessian_iters: int = 20, seed: int = 0
) -> dict:
    """{'loss', 'ascent_sharpness', 'random_sharpness', 'hessian_top_eigenvalue'} of `model` on `batches` (dicts of
    model inputs with labels, so that `model(**batch).loss` exists), as floats. `num_directions` or `hessian_iters`
    of 0 skip that figure (None)."""
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if num_directions < 0 or hessian_iters < 0:
        raise ValueError("num_directions and hessian_iters must be >= 0")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("measure_sharpness: the model has no parameter with requires_grad=True")
    device = params[0].device
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()} for batch in batches]
    if not batches:
        raise ValueError("measure_sharpness: no batches")
    generator = torch.Generator().manual_seed(seed)
    with evaluation_mode(model, params) as original:
        loss = mean_loss(model, batches)
        gradient = mean_gradient(model, params, batches)
        ascent_sharpness = loss_at(model, params, original, gradient, rho, batches) - loss
        random_sharpness = None
        if num_directions:
            shifts = [loss_at(model, params, original, gaussian_like(params, generator), rho, batches) - loss
                      for _ in range(num_directions)]
            random_sharpness = sum(shifts) / num_directions
        top_eigenvalue = (top_hessian_eigenvalue(model, params, batches, hessian_iters, generator)
                          if hessian_iters else None)
    return {"loss": loss, "ascent_sharpness": ascent_sharpness, "random_sharpness": random_sharpness,
            "hessian_top_eigenvalue": top_eigenvalue}


@contextmanager
def evaluation_mode(model: nn.Module, params: list):
    """Eval mode for the block; yields copies of `params` and puts them back (bit-identical) and every module's
    train/eval flag afterwards, also on error."""
    modes = [(module, module.training) for module in model.modules()]
    original = [p.detach().clone() for p in params]
    model.eval()
    try:
        yield original
    finally:
        with torch.no_grad():
            for p, saved in zip(params, original):
                p.copy_(saved)
        for module, training in modes:
            module.training = training


def batch_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's own loss on one batch (its `labels` decide what it is)."""
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("measure_sharpness: the model returned no loss; the batches need their labels")
    return loss


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list) -> float:
    """L(θ) = mean over batches of the batch loss."""
    return sum(batch_loss(model, batch).float().item() for batch in batches) / len(batches)


def mean_gradient(model: nn.Module, params: list, batches: list) -> list:
    """∇L(θ) = mean over batches of each batch loss's gradient (torch.autograd.grad: `.grad` stays untouched)."""
    total = [torch.zeros_like(p) for p in params]
    for batch in batches:
        grads = torch.autograd.grad(batch_loss(model, batch), params, allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t.add_(g)
    return [t / len(batches) for t in total]


def gaussian_like(params: list, generator: torch.Generator) -> list:
    """u ~ N(0, I) shaped like `params`, drawn on the CPU from `generator` (the same on every device)."""
    return [torch.randn(p.shape, generator=generator).to(p) for p in params]


@torch.no_grad()
def loss_at(model: nn.Module, params: list, original: list, direction: list, rho: float, batches: list) -> float:
    """L(θ + ρ d/‖d‖), then θ restored; L(θ) itself if d = 0."""
    norm = grad_norm(direction)
    if norm == 0:
        return mean_loss(model, batches)
    scale = rho / norm
    for p, saved, d in zip(params, original, direction):
        p.copy_(saved + (scale * d.float()).to(p.dtype))
    try:
        return mean_loss(model, batches)
    finally:
        for p, saved in zip(params, original):
            p.copy_(saved)


def hessian_vector_product(model: nn.Module, params: list, batches: list, vector: list) -> list:
    """∇²L(θ) v = mean over batches of ∇(∇L_b(θ) · v), by double backward (attention on its differentiable-twice
    math kernel)."""
    total = [torch.zeros_like(p) for p in params]
    with sdpa_kernel(SDPBackend.MATH):
        for batch in batches:
            grads = torch.autograd.grad(batch_loss(model, batch), params, create_graph=True, allow_unused=True)
            pairs = [(g, v) for g, v in zip(grads, vector) if g is not None]
            if not pairs or not any(g.requires_grad for g, _ in pairs):
                continue  # the loss is linear in θ here: no curvature
            dot = sum((g * v).sum() for g, v in pairs)
            hv = torch.autograd.grad(dot, params, allow_unused=True)
            for t, h in zip(total, hv):
                if h is not None:
                    t.add_(h.detach())
    return [t / len(batches) for t in total]


def power_iteration(product, start: list, iters: int) -> float:
    """Eigenvalue of largest magnitude of the symmetric operator `product` (v -> Av), from ‖v‖ = 1: the Rayleigh
    quotient vᵀAv, then v <- Av/‖Av‖; `iters` products in all."""
    v = [t / grad_norm(start) for t in start]
    quotient = 0.0
    for _ in range(iters):
        av = product(v)
        quotient = sum((a.float() * b.float()).sum() for a, b in zip(av, v)).item()
        norm = grad_norm(av)
        if norm == 0:
            break
        v = [t / norm for t in av]
    return quotient


def top_hessian_eigenvalue(model: nn.Module, params: list, batches: list, iters: int,
                           generator: torch.Generator) -> float:
    """λ_max(∇²L(θ)). Power iteration finds the eigenvalue λ₁ of largest magnitude; if it is negative (a saddle
    whose negative curvature dominates), a second run on ∇²L − λ₁I, whose spectrum is λ − λ₁ ≥ 0, finds
    λ_max − λ₁."""
    def product(v):
        return hessian_vector_product(model, params, batches, v)

    largest = power_iteration(product, gaussian_like(params, generator), iters)
    if largest >= 0:
        return largest
    return largest + power_iteration(lambda v: [h - largest * t for h, t in zip(product(v), v)],
                                     gaussian_like(params, generator), iters)
