"""Ascent directions and the SAM perturbation (pure torch; knows nothing of Trainer).

All functions act on a list of parameter tensors: the arms selected this step. Norms are taken over that list
only. The tensors may be DTensors (FSDP2's sharded parameters): every update is then elementwise on the local
shards, and norms and sums are reductions over all shards, so each process computes the same global values.
"""

import functools
from collections.abc import Callable
from typing import Protocol

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


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
    backup: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Two-point estimate of the gradient from forwards only:

        g = 1/m * sum_k c_k u_k,   c_k = (l(theta + eps u_k) - l(theta - eps u_k)) / (2 eps).

    Without `prior`, u_k ~ N(0, I) (ZO-SAM), drawn from private generators seeded with `seed` (one per device).
    With `prior` (one tensor per param, e.g. the optimizer's first moment), there is one direction
    u = sqrt(n) * prior / ||prior|| (n elements: a Gaussian's norm, so `eps` means the same per coordinate), and
    g = c u points along +-prior, uphill: the probe only picks the sign.

    `loss_fn()` evaluates the loss at the current parameters (called under no_grad). The parameters are
    restored bit-exactly, copied back from `backup` (a copy of `params` the caller holds; taken here when None).
    Every decision stays on the device (no host sync): a c_k that is not finite (a probe loss overflowed) counts as
    0, and so does u when the prior's norm is 0 or not finite (the prior itself must be finite). g is then 0, which
    `perturb` does not move along.
    """
    if prior is not None:
        norm = grad_norm(prior)
        n = sum(p.numel() for p in params)
        scale = torch.where(torch.isfinite(norm) & (norm > 0), n**0.5 / norm, 0.0)
        prior_direction = torch._foreach_mul([m.to(p.dtype) for p, m in zip(params, prior)], scale)
        num_directions = 1
    generators = {}
    backup = [p.detach().clone() for p in params] if backup is None else backup
    estimate = None
    try:
        for _ in range(num_directions):
            u = prior_direction if prior is not None else [gaussian_like(p, generators, seed) for p in params]
            torch._foreach_add_(params, u, alpha=eps)
            loss_plus = loss_fn()
            torch._foreach_add_(params, u, alpha=-2 * eps)
            loss_minus = loss_fn()
            restore(params, backup)
            c = (loss_plus.double() - loss_minus.double()) / (2 * eps)
            torch._foreach_mul_(u, torch.where(torch.isfinite(c), c, 0.0) / num_directions)
            estimate = u if estimate is None else torch._foreach_add(estimate, u)
    finally:
        restore(params, backup)
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
    """u ~ N(0, I) shaped like `param`, drawn from the generator of its device (created with `seed`). For a DTensor
    the whole tensor is drawn and its local shard kept, so u is the same for every world size (each process draws
    every element once)."""
    if param.device not in generators:
        generators[param.device] = torch.Generator(param.device).manual_seed(seed)
    return like(param, torch.randn(param.shape, generator=generators[param.device], device=param.device,
                                   dtype=param.dtype))


def like(param: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`t`, a whole tensor shaped like `param` or, for a DTensor, possibly its local shard, laid out as `param`: a
    DTensor takes its local chunk of a whole tensor (no communication) or wraps its shard (a shard shaped like the
    whole tensor is that chunk, so both readings agree)."""
    t = t.to(param.device)
    if not isinstance(param, DTensor):
        return t
    if t.shape == param.shape:
        return distribute_tensor(t, param.device_mesh, param.placements, src_data_rank=None)
    return DTensor.from_local(t, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def full(t: torch.Tensor) -> torch.Tensor:
    """The global value of `t` as a plain tensor: a DTensor's full tensor (a reduction over shards for a norm or a
    sum), any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each DTensor's local shard (it shares the DTensor's storage), other tensors as they are."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def tensor_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """||t||_2 of each tensor, stacked, in at least float32 (one `torch._foreach_norm`: a few kernel launches; for
    DTensors one reduction over the shards)."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    if any(isinstance(t, DTensor) for t in tensors):  # torch 2.14's DTensor refuses _foreach_norm's dtype argument
        return full(torch.stack(torch._foreach_norm([t.to(dtype) for t in tensors], 2)))
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))


def grad_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """||tensors||_2 over the whole list, accumulated in at least float32."""
    return torch.linalg.vector_norm(tensor_norms(tensors))


@torch.no_grad()
def perturb(
    params: list[torch.Tensor],
    direction: list[torch.Tensor],
    rho: float,
    adaptive: bool = False,
    backup: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """theta <- theta + e with e = rho * T^2 g / ||T g||, T = |theta| for ASAM (`adaptive`), else the identity;
    e = 0 when ||T g|| is 0 or not finite. Foreach kernels and no host sync, so `direction` must be finite
    (`GradientAscent` drops a gradient that overflowed).

    Returns (a copy of the unperturbed parameters for `restore`: `backup` when the caller already holds one,
    whether theta moved: a bool tensor on the device).
    """
    magnitude = torch._foreach_abs(params) if adaptive else None
    scaled = torch._foreach_mul(direction, magnitude) if adaptive else direction
    norm = grad_norm(scaled)
    moved = torch.isfinite(norm) & (norm > 0)
    steps = torch._foreach_mul(scaled, magnitude) if adaptive else scaled
    steps = torch._foreach_mul(steps, torch.where(moved, rho / norm, 0.0))
    backup = [p.detach().clone() for p in params] if backup is None else backup
    torch._foreach_add_(params, [step.to(p.dtype) for p, step in zip(params, steps)])
    return backup, moved


@torch.no_grad()
def restore(params: list[torch.Tensor], backup: list[torch.Tensor]) -> None:
    """theta <- the copy `perturb` kept: exact, also for bf16/fp16 weights (DTensors: shard by shard)."""
    torch._foreach_copy_(local(params), local(backup))


def cosine_similarity(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """cos(a, b) of two directions given as tensor lists."""
    dot = full(sum((x.float() * y.float()).sum() for x, y in zip(a, b)))
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

    def backup(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """A copy of `params` at theta, shared by the probes and the perturbation of this micro-batch."""


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
    """SAM: g = dL/dtheta (one extra backward); ASAM with `adaptive`. A gradient that is not finite (an fp16
    overflow) gives no direction: one host sync, which the zero-order and momentum directions do without."""

    first_order = True

    def __init__(self, adaptive: bool = False):
        self.adaptive = adaptive

    def direction(self, params, source):
        g = source.gradient(params)
        return params, g if torch.isfinite(grad_norm(g)) else None


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
        return params, zero_order_direction(source.loss, params, self.num_directions, self.eps, source.seed, prior,
                                            source.backup(params))


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
