"""measure_sharpness against independent computations: losses and gradients through torch.func on a flat parameter
vector, and the full Hessian's eigvalsh on models small enough to build it."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call

from conftest import classification_data, tiny_bert, tiny_llama
from slsam_hf import measure_sharpness


class TinyClassifier(nn.Module):
    """4 -> 3 -> 2 MLP with a cross-entropy loss, called like a transformers model (27 parameters)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden, self.dropout, self.out = nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 2)

    def forward(self, x, labels=None):
        logits = self.out(self.dropout(torch.tanh(self.hidden(x))))
        return SimpleNamespace(loss=None if labels is None else nn.functional.cross_entropy(logits, labels))


class Quadratic(nn.Module):
    """loss = ½ θᵀAθ + bᵀθ: its Hessian is A, whatever the batch."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a, self.theta = a, nn.Parameter(torch.ones(a.shape[0]))

    def forward(self, labels):
        return SimpleNamespace(loss=0.5 * self.theta @ self.a @ self.theta + labels.float().sum() * self.theta.sum())


def batches_of(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(n, 4, generator=g), "labels": torch.randint(0, 2, (n,), generator=g)} for n in sizes]


def reference_loss(model, names, batches):
    """L(θ) as a function of the flat vector of the named parameters: mean over batches of the batch loss."""
    shapes = [dict(model.named_parameters())[n].shape for n in names]

    def loss(flat):
        chunks = torch.split(flat, [s.numel() for s in shapes])
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return torch.stack([functional_call(model, params, kwargs=b).loss for b in batches]).mean()

    return loss


def flat_params(model, names):
    return torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])


def test_losses_and_sharpness_equal_a_reference_on_the_flat_vector():
    model, batches = TinyClassifier(), batches_of([5, 3, 8])  # unequal batches: the mean of batch means
    names = [n for n, _ in model.named_parameters()]
    rho, directions = 0.3, 3
    result = measure_sharpness(model, batches, rho=rho, num_directions=directions, hessian_iters=0, seed=7)

    model.eval()  # the reference is the eval-mode model too (dropout off)
    loss, theta = reference_loss(model, names, batches), flat_params(model, names)
    base = loss(theta).item()
    grad = torch.func.grad(loss)(theta)
    g = torch.Generator().manual_seed(7)  # the draws: one N(0, I) per parameter, in parameter order, per direction
    shifts = []
    for _ in range(directions):
        u = torch.cat([torch.randn(p.shape, generator=g).reshape(-1) for p in model.parameters()])
        shifts.append(loss(theta + rho * u / u.norm()).item() - base)
    assert result["loss"] == pytest.approx(base, rel=1e-6)
    assert result["ascent_sharpness"] == pytest.approx(loss(theta + rho * grad / grad.norm()).item() - base, rel=1e-4)
    assert result["random_sharpness"] == pytest.approx(sum(shifts) / directions, rel=1e-4, abs=1e-7)
    assert result["ascent_sharpness"] > 0 and result["hessian_top_eigenvalue"] is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_eigenvalue_equals_eigvalsh_of_the_full_hessian(seed):
    model, batches = TinyClassifier(seed), batches_of([6, 6], seed)
    names = [n for n, _ in model.named_parameters()]
    model.eval()
    hessian = torch.autograd.functional.hessian(reference_loss(model, names, batches), flat_params(model, names))
    expected = torch.linalg.eigvalsh(hessian).max().item()
    result = measure_sharpness(model, batches, num_directions=0, hessian_iters=300, seed=seed)
    assert result["hessian_top_eigenvalue"] == pytest.approx(expected, rel=1e-3)


def test_top_eigenvalue_when_negative_curvature_dominates():
    """Power iteration alone finds -3 here; the shifted second run must find the largest eigenvalue, 2."""
    a = torch.diag(torch.tensor([-3.0, 1.0, 2.0]))
    q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))[0]
    model = Quadratic(q @ a @ q.T)
    result = measure_sharpness(model, [{"labels": torch.ones(2)}], num_directions=0, hessian_iters=200)
    assert result["hessian_top_eigenvalue"] == pytest.approx(2.0, rel=1e-4)


def test_only_trainable_parameters_count():
    model, batches = TinyClassifier(), batches_of([8])
    model.hidden.requires_grad_(False)
    names = ["out.weight", "out.bias"]
    model.eval()
    hessian = torch.autograd.functional.hessian(reference_loss(model, names, batches), flat_params(model, names))
    result = measure_sharpness(model, batches, num_directions=0, hessian_iters=300)
    assert result["hessian_top_eigenvalue"] == pytest.approx(torch.linalg.eigvalsh(hessian).max().item(), rel=1e-3)


def test_model_is_left_exactly_as_found():
    model = tiny_bert()
    model.train()
    model.bert.embeddings.eval()  # a mixed train/eval state must come back as it was
    model.classifier.weight.grad = torch.full_like(model.classifier.weight, 3.0)
    data = classification_data(8)
    batch = {k: torch.tensor(data[k]) for k in data.column_names}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    result = measure_sharpness(model, [batch], num_directions=2, hessian_iters=3)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert torch.equal(model.classifier.weight.grad, torch.full_like(model.classifier.weight, 3.0))
    assert all(v is not None and torch.isfinite(torch.tensor(v)) for v in result.values())


def test_lora_model_measures_the_adapters_only():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = measure_sharpness(model, [{"input_ids": ids, "labels": ids}], num_directions=2, hessian_iters=5)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert result["ascent_sharpness"] > 0 and result["hessian_top_eigenvalue"] > 0


def test_bad_inputs_raise_clear_errors():
    model = TinyClassifier()
    with pytest.raises(ValueError, match="labels"):
        measure_sharpness(model, [{"x": torch.randn(2, 4)}])
    with pytest.raises(ValueError, match="rho"):
        measure_sharpness(model, batches_of([2]), rho=0)
    with pytest.raises(ValueError, match="no batches"):
        measure_sharpness(model, [])
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        measure_sharpness(model, batches_of([2]))
