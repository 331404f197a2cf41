"""How a sparse step moves the weights (`sparse_update`, `selection_interval`), against AdamW steps computed by hand."""

import math

import pytest
import torch
from conftest import classification_data, sam_args, tiny_bert
from transformers import TrainerCallback

from slsam_hf import SAMTrainer


def adamw_step(theta, grad, state, group):
    """torch.optim.AdamW's update of one tensor, written out: decoupled decay, then m / (sqrt(v) + eps) with bias
    correction; `state` is the tensor's state before the step ({} if none)."""
    b1, b2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    m = state.get("exp_avg", torch.zeros_like(theta)).double()
    v = state.get("exp_avg_sq", torch.zeros_like(theta)).double()
    t = int(state.get("step", torch.tensor(0.0)).item()) + 1
    g = grad.double()
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    theta = theta.double() * (1 - lr * wd)
    return theta - lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + eps)


class SparseStepRecorder(TrainerCallback):
    """Per optimizer step: parameters and optimizer state before, the gradients the optimizer sees (after clipping),
    the held selection and its probabilities, and the parameters and state after."""

    def __init__(self):
        self.trainer, self.steps = None, []

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.steps.append({"before": self._params(model), "state_before": self._state(model, optimizer)})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps[-1]["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if self.trainer.selector is None:
            return
        selected, probs = self.trainer._held
        self.steps[-1].update(
            arm_prob={name: float(prob) for i, prob in zip(selected, probs)
                      for name in self.trainer.arms[i].param_names},
            selected=selected.tolist(), probabilities=self.trainer.selector.probabilities.copy(),
        )

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.steps[-1].update(after=self._params(model), state_after=self._state(model, optimizer))

    @staticmethod
    def _params(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    @staticmethod
    def _state(model, optimizer):
        return {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()
                if p in optimizer.state}


def run(tmp_path, **overrides):
    recorder = SparseStepRecorder()
    args = sam_args(tmp_path, sam_mode="none", weight_decay=0.1, lr_scheduler_type="constant", learning_rate=1e-2,
                    **{"max_steps": 5, **overrides})
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=classification_data(), callbacks=[recorder])
    recorder.trainer = trainer
    trainer.train()
    groups = {n: g for n, p in trainer.model.named_parameters() for g in trainer.optimizer.param_groups
              if any(p is q for q in g["params"])}
    return trainer, recorder.steps, groups


def assert_step(after, expected, name):
    torch.testing.assert_close(after.double(), expected, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("max_scale", [10.0, 1.5])
def test_scale_multiplies_each_selected_arms_adamw_step_by_its_inverse_probability(tmp_path, max_scale):
    trainer, steps, groups = run(tmp_path, sparse_update="scale", sparse_update_max_scale=max_scale)
    head = set(trainer.always_selected.param_names)
    scaled = 0
    for step in steps:
        assert head <= set(step["grads"]) and set(step["grads"]) - head <= set(step["arm_prob"])
        for name, grad in step["grads"].items():
            theta = step["before"][name]
            dense = adamw_step(theta, grad, step["state_before"].get(name, {}), groups[name])
            k = 1.0 if name in head else min(1 / step["arm_prob"][name], max_scale)
            scaled += k > 1
            assert_step(step["after"][name], theta.double() + k * (dense - theta.double()), name)
        for name in set(step["before"]) - set(step["grads"]):  # unselected: frozen
            assert torch.equal(step["before"][name], step["after"][name]), name
    assert scaled > 0


def test_momentum_carries_unselected_tensors_that_have_optimizer_state(tmp_path):
    trainer, steps, groups = run(tmp_path, sparse_update="momentum", max_steps=6)
    carried = 0
    for step in steps:
        for name, theta in step["before"].items():
            state = step["state_before"].get(name)
            if name in step["grads"]:  # selected: an ordinary AdamW step
                assert_step(step["after"][name], adamw_step(theta, step["grads"][name], state or {}, groups[name]),
                            name)
            elif state is not None:  # unselected with state: an AdamW step with a zero gradient
                carried += 1
                assert_step(step["after"][name], adamw_step(theta, torch.zeros_like(theta), state, groups[name]), name)
                assert step["state_after"][name]["step"] == state["step"] + 1
            else:  # never selected: untouched, and no optimizer state is created for it
                assert torch.equal(step["after"][name], theta) and name not in step["state_after"], name
    assert carried > 0, "no unselected tensor with optimizer state was seen"
    assert all(p.grad is None for p in trainer.model.parameters()), "the zero gradients are cleared with the rest"


@pytest.mark.parametrize("rule", ["scale", "momentum"])
def test_rules_do_nothing_without_selection(tmp_path, rule):
    """With layer_selection='all' nothing is unselected and every p is 1: the stock AdamW step, bit for bit."""
    _, plain, _ = run(tmp_path / "freeze", layer_selection="all")
    _, ruled, _ = run(tmp_path / rule, layer_selection="all", sparse_update=rule)
    for a, b in zip(plain, ruled):
        assert all(torch.equal(a["after"][n], b["after"][n]) for n in a["after"])


def test_selection_interval_holds_the_draw_while_the_bandit_keeps_learning(tmp_path):
    trainer, steps, _ = run(tmp_path, selection_interval=3, max_steps=7)
    draws = [tuple(step["selected"]) for step in steps]
    assert draws[0] == draws[1] == draws[2] and draws[3] == draws[4] == draws[5]
    assert len({draws[0], draws[3], draws[6]}) == 3
    for earlier, later in zip(steps, steps[1:]):
        assert not (earlier["probabilities"] == later["probabilities"]).all(), "the bandit must learn every step"
    # A held selection is the draw of the step that started it, from the probabilities of that step.
    assert list(draws[3]) == _with_probs(trainer, steps[2]["probabilities"]).select(3).tolist()
    assert trainer.history.counts[1] == trainer.history.counts[0]


def _with_probs(trainer, probabilities):
    selector = type(trainer.selector)(len(trainer.arms), trainer.args.selection_budget, seed=trainer.args.seed,
                                      arm_sizes=[arm.numel for arm in trainer.arms])
    selector.probabilities = probabilities
    return selector


def test_scale_under_bf16_autocast_and_weights_stay_finite(tmp_path):
    trainer, steps, _ = run(tmp_path, sparse_update="scale", bf16=True, max_steps=3)
    assert all(math.isfinite(float(p.detach().sum())) for p in trainer.model.parameters())
    assert len(steps) == 3
