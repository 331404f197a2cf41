"""SAMTrainer against independent reference computations and against stock `Trainer`."""

import copy
import json
import os
import types

import pytest
import torch
from conftest import classification_data, lm_data, sam_args, tiny_bert, tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, default_data_collator

from slsam_hf import SAMTrainer
from slsam_hf.ascent import gaussian_like
from slsam_hf.selection import UniformSelector
from slsam_hf.trainer import derive_seed

MODES = ["none", "sam", "asam", "zo", "msam", "lookback"]


def lora(model):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(model, config)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def batch(data, rows=4):
    return default_data_collator([data[i] for i in range(rows)])


def reference_loss(model, inputs, loss_source="model"):
    """The model's own loss, or cross-entropy with label smoothing 0.1 (what `label_smoothing_factor=0.1` and
    `smoothed_cross_entropy` compute)."""
    outputs = model(**inputs)
    return outputs.loss if loss_source == "model" else smoothed_cross_entropy(outputs, inputs["labels"])


def loss_and_grads(model, inputs, params, loss_source="model"):
    loss = reference_loss(model, inputs, loss_source)
    return loss, torch.autograd.grad(loss, params)


def smoothed_cross_entropy(outputs, labels, num_items_in_batch=None):
    return torch.nn.functional.cross_entropy(outputs.logits, labels, label_smoothing=0.1)


# How the trainer gets its loss: the model's own, stock label smoothing (compute_loss pops the labels), or a
# compute_loss_func (also pops them).
LOSS_SOURCES = {"model": ({}, {}), "label_smoothing": ({"label_smoothing_factor": 0.1}, {}),
                "compute_loss_func": ({}, {"compute_loss_func": smoothed_cross_entropy})}


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_none_with_all_arms_is_stock_trainer_bit_for_bit(tmp_path, use_lora):
    results = []
    for trainer_cls in (Trainer, SAMTrainer):
        model = lora(tiny_bert()) if use_lora else tiny_bert()
        args = sam_args(tmp_path / trainer_cls.__name__, sam_mode="none", layer_selection="all", max_steps=5)
        trainer = trainer_cls(model=model, args=args, train_dataset=classification_data())
        trainer.train()
        results.append(params_of(model))
    stock, sam = results
    assert stock.keys() == sam.keys()
    for name in stock:
        assert torch.equal(stock[name], sam[name]), name
    moved = params_of(lora(tiny_bert()) if use_lora else tiny_bert())
    assert any(not torch.equal(moved[n], sam[n]) for n in sam), "training did not move anything"


def one_step_trainer(tmp_path, model, loss_source="model", **overrides):
    arg_overrides, trainer_kwargs = LOSS_SOURCES[loss_source]
    args = sam_args(tmp_path, layer_selection="all", sam_rho=0.1, **arg_overrides, **overrides)
    trainer = SAMTrainer(model=model, args=args, train_dataset=classification_data(), **trainer_kwargs)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@pytest.mark.parametrize("ascent_fraction", [1.0, 0.5])
@pytest.mark.parametrize("loss_source", LOSS_SOURCES)
@pytest.mark.parametrize("mode", ["sam", "asam"])
def test_first_order_update_gradient_matches_reference(tmp_path, mode, loss_source, ascent_fraction):
    model = tiny_bert(dropout=0.0)
    reference = copy.deepcopy(model)
    trainer = one_step_trainer(tmp_path, model, loss_source, sam_mode=mode, sam_ascent_fraction=ascent_fraction)
    inputs = batch(classification_data())
    before = params_of(model)
    loss = trainer.training_step(model, inputs)

    params = list(reference.parameters())
    ascent_rows = {k: v[: int(4 * ascent_fraction)] for k, v in inputs.items()}  # g from the leading rows only
    clean_loss, g = loss_and_grads(reference, ascent_rows, params, loss_source)
    with torch.no_grad():
        if mode == "sam":  # e = rho g / ||g||
            e = [0.1 * gi / torch.cat([x.flatten() for x in g]).norm() for gi in g]
        else:  # ASAM: e = rho |w|^2 g / || |w| g ||
            norm = torch.cat([(p.abs() * gi).flatten() for p, gi in zip(params, g)]).norm()
            e = [0.1 * p.square() * gi / norm for p, gi in zip(params, g)]
        for p, ei in zip(params, e):
            p.add_(ei)
    perturbed_loss, expected = loss_and_grads(reference, inputs, params, loss_source)
    for (name, p), ref in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, ref, atol=1e-6, rtol=1e-6, msg=name)
        assert torch.equal(p.detach(), before[name]), f"{name} not restored exactly"
    # The logged loss: at theta when the ascent saw the whole batch, else the perturbed one.
    torch.testing.assert_close(loss, (clean_loss if ascent_fraction == 1 else perturbed_loss).detach())


@pytest.mark.parametrize("loss_source", LOSS_SOURCES)
def test_zero_order_update_gradient_matches_reference(tmp_path, loss_source):
    model = tiny_bert(dropout=0.0)
    reference = copy.deepcopy(model)
    trainer = one_step_trainer(tmp_path, model, loss_source, sam_mode="zo", zo_direction="gaussian",
                               zo_probe_fraction=1.0, zo_eps=1e-2)
    inputs = batch(classification_data())
    before = params_of(model)
    trainer.training_step(model, inputs)

    params = list(reference.parameters())
    generators = {}
    u = [gaussian_like(p, generators, derive_seed(0, 0, 0)) for p in params]
    with torch.no_grad():
        for p, ui in zip(params, u):
            p.add_(1e-2 * ui)
        plus = reference_loss(reference, inputs, loss_source)
        for p, ui in zip(params, u):
            p.sub_(2e-2 * ui)
        minus = reference_loss(reference, inputs, loss_source)
        for p, ui in zip(params, u):
            p.add_(1e-2 * ui)
        c = (plus - minus) / 2e-2
        norm = torch.cat([(c * ui).flatten() for ui in u]).norm()
        for p, ui in zip(params, u):
            p.add_(0.1 * c * ui / norm)
    _, expected = loss_and_grads(reference, inputs, params, loss_source)
    for (name, p), ref in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, ref, atol=1e-5, rtol=1e-4, msg=name)
        assert torch.equal(p.detach(), before[name]), f"{name} not restored exactly"


def trained_trainer(tmp_path, **overrides):
    """A trainer after two AdamW-stepped optimizer steps (so the optimizer has a first moment), no dropout, ready
    for one more training_step by hand."""
    args = sam_args(tmp_path, sam_rho=0.1, max_steps=2, **overrides)
    trainer = SAMTrainer(model=tiny_bert(dropout=0.0), args=args, train_dataset=classification_data())
    trainer.train()
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad()
    return trainer


def capture_perturbation(monkeypatch):
    """Records the (params, direction) that the trainer passes to `perturb`."""
    import slsam_hf.trainer as trainer_module

    seen = []

    def spy(params, direction, rho, adaptive=False, backup=None):
        seen.append(([p for p in params], [d.clone() for d in direction]))
        return trainer_module_perturb(params, direction, rho, adaptive, backup)

    trainer_module_perturb = trainer_module.perturb
    monkeypatch.setattr(trainer_module, "perturb", spy)
    return seen


def update_gradient_at(model, inputs, params, shift):
    """Gradient of the loss on `params` at theta + shift (tensor list), computed on a copy of `model`."""
    reference = copy.deepcopy(model)
    by_id = {id(p): q for p, q in zip(model.parameters(), reference.parameters())}
    ref_params = [by_id[id(p)] for p in params]
    with torch.no_grad():
        for q, e in zip(ref_params, shift):
            q.add_(e)
    for q in reference.parameters():
        q.requires_grad_(True)
    return torch.autograd.grad(reference(**inputs).loss, ref_params)


@pytest.mark.parametrize(("selection", "fraction"), [("all", 1.0), ("bandit", 1.0), ("bandit", 0.5)])
def test_momentum_probe_perturbs_along_adamws_first_moment_signed_by_the_finite_difference(
        tmp_path, monkeypatch, selection, fraction):
    trainer = trained_trainer(tmp_path, sam_mode="zo", zo_direction="momentum", zo_eps=1e-2, zo_probe_fraction=fraction,
                              layer_selection=selection, sparse_update="scale" if selection == "bandit" else "freeze")
    model, inputs = trainer.model, batch(classification_data())
    probe_rows = {k: v[: int(4 * fraction)] for k, v in inputs.items()}  # the probe sees the leading rows only
    seen = capture_perturbation(monkeypatch)
    before = params_of(model)
    trainer.training_step(model, inputs)
    (params, direction), = seen
    # The probed tensors: the selected ones (arms drawn this step + the head) that have optimizer state.
    selected = {id(p) for p in trainer._params}
    expected_params = [p for p in model.parameters() if id(p) in selected and p in trainer.optimizer.state]
    assert [id(p) for p in params] == [id(p) for p in expected_params]
    if selection == "bandit":
        assert len(params) < len(list(model.parameters()))
    m = [trainer.optimizer.state[p]["exp_avg"] for p in params]
    # Independent sign: the central difference of the eval-mode loss along u = sqrt(n) m / ||m||.
    n = sum(p.numel() for p in params)
    norm = torch.cat([x.flatten() for x in m]).norm()
    reference = copy.deepcopy(model).eval()
    by_id = {id(p): q for p, q in zip(model.parameters(), reference.parameters())}
    with torch.no_grad():
        for p, mi in zip(params, m):
            by_id[id(p)].add_(1e-2 * n**0.5 * mi / norm)
        plus = reference(**probe_rows).loss
        for p, mi in zip(params, m):
            by_id[id(p)].sub_(2e-2 * n**0.5 * mi / norm)
        minus = reference(**probe_rows).loss
    sign = torch.sign(plus - minus)
    assert sign != 0
    for d, mi in zip(direction, m):  # direction = c u: parallel to m, with the finite difference's sign
        torch.testing.assert_close(d / d.abs().max().clamp_min(1e-30) * mi.abs().max(), sign * mi, rtol=1e-4,
                                   atol=1e-9)
    c = sum((d * mi).sum() for d, mi in zip(direction, m)) / (n**0.5 * norm)  # direction = c sqrt(n) m / ||m||
    assert c == pytest.approx(float((plus - minus) / 2e-2), rel=1e-3, abs=1e-6)
    shift = [0.1 * sign * mi / norm for mi in m]
    expected = update_gradient_at(model, inputs, params, shift)
    for p, ref in zip(params, expected):
        torch.testing.assert_close(p.grad, ref, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()), "restored exactly"


def test_msam_perturbs_along_minus_the_raw_first_moment(tmp_path, monkeypatch):
    trainer = trained_trainer(tmp_path, sam_mode="msam", layer_selection="all")
    model, inputs = trainer.model, batch(classification_data())
    seen = capture_perturbation(monkeypatch)
    trainer.training_step(model, inputs)
    (params, direction), = seen
    m = [trainer.optimizer.state[p]["exp_avg"] for p in params]
    assert len(params) == len(list(model.parameters()))
    assert all(torch.equal(d, -mi) for d, mi in zip(direction, m))
    norm = torch.cat([x.flatten() for x in m]).norm()
    expected = update_gradient_at(model, inputs, params, [-0.1 * mi / norm for mi in m])
    for p, ref in zip(params, expected):
        torch.testing.assert_close(p.grad, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["msam", "zo"])
def test_first_step_without_optimizer_state_is_not_perturbed(tmp_path, mode):
    args = sam_args(tmp_path, sam_mode=mode, zo_direction="momentum", max_steps=3, logging_steps=1)
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=classification_data())
    trainer.train()
    skipped = [log["perturbation_skipped"] for log in trainer.state.log_history if "perturbation_skipped" in log]
    assert skipped[0] == 1 and skipped[-1] == 0


class StepRecorder(TrainerCallback):
    """Per optimizer step: parameters and AdamW state before, which tensors had a gradient, and after."""

    def __init__(self):
        self.steps = []

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.steps.append({"before": params_of(model), "state_before": self._opt_state(model, optimizer)})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps[-1]["with_grad"] = {n for n, p in model.named_parameters() if p.grad is not None}
        self.steps[-1]["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.steps[-1]["after"] = params_of(model)
        self.steps[-1]["state_after"] = self._opt_state(model, optimizer)

    @staticmethod
    def _opt_state(model, optimizer):
        return {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()
                if p in optimizer.state}


@pytest.mark.parametrize("mode", MODES)
def test_unselected_arms_get_no_gradient_no_update_no_adamw_state(tmp_path, mode):
    model = tiny_bert()
    recorder = StepRecorder()
    args = sam_args(tmp_path, sam_mode=mode, layer_selection="bandit", max_steps=4, weight_decay=0.1)
    trainer = SAMTrainer(model=model, args=args, train_dataset=classification_data(), callbacks=[recorder])
    trainer.train()
    assert_only_selected_tensors_move(model, recorder.steps)


def assert_only_selected_tensors_move(model, steps):
    """Per recorded step: the new head had a gradient, some tensors had none, and those neither moved nor changed
    their AdamW state; something moved; every requires_grad flag is back on after training."""
    all_names = {n for n, _ in model.named_parameters()}
    head = {"classifier.weight", "classifier.bias"}
    for step in steps:
        assert head <= step["with_grad"], "the new task head is always selected"
        frozen = all_names - step["with_grad"]
        assert frozen, "budget 0.2 must leave arms out"
        for name in frozen:
            assert torch.equal(step["before"][name], step["after"][name]), name
            before, after = step["state_before"].get(name), step["state_after"].get(name)
            assert (before is None) == (after is None), name
            if before is not None:
                assert all(torch.equal(before[k], after[k]) for k in before), name
        assert any(not torch.equal(step["before"][n], step["after"][n]) for n in step["with_grad"])
    assert all(p.requires_grad for p in model.parameters()), "requires_grad restored after training"


def test_model_init_trains_the_new_model_with_selection(tmp_path):
    """train() rebuilds the model from model_init: arms, selector and logs follow the new model."""
    recorder = StepRecorder()
    args = sam_args(tmp_path, max_steps=4, weight_decay=0.1)
    trainer = SAMTrainer(model_init=lambda: tiny_bert(), args=args, train_dataset=classification_data(),
                         callbacks=[recorder])
    built_at_construction = trainer.model
    trainer.train()
    model = trainer.model
    assert model is not built_at_construction
    grouped = [p for arm in trainer.arms for p in arm.params] + trainer.always_selected.params
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    assert_only_selected_tensors_move(model, recorder.steps)
    ratios = [log["active_param_ratio"] for log in trainer.state.log_history if "active_param_ratio" in log]
    assert len(ratios) == 4 and all(0 < r < 1 for r in ratios)


def test_hyperparameter_search_trial_options_rebuild_the_selector(tmp_path, monkeypatch):
    """A trial's options reach the selector. Optuna is not installed here: a stand-in trial goes through the
    Optuna path of `train(trial=...)` (hp_space gives its options)."""
    import transformers.integrations
    from transformers.trainer_utils import HPSearchBackend

    trial = types.SimpleNamespace(number=0, params={"layer_selection": "random", "selection_budget": 0.5})
    monkeypatch.setattr(transformers.integrations, "hp_params", lambda trial: trial.params)
    trainer = SAMTrainer(model_init=lambda: tiny_bert(), args=sam_args(tmp_path, max_steps=2),
                         train_dataset=classification_data())
    trainer.hp_search_backend, trainer.hp_space = HPSearchBackend.OPTUNA, lambda trial: trial.params
    trainer.train(trial=trial)
    assert type(trainer.selector) is UniformSelector
    assert trainer.selector.probabilities.tolist() == [0.5] * len(trainer.arms)


def test_optimizer_holds_every_arm(tmp_path):
    model = tiny_bert()
    trainer = SAMTrainer(model=model, args=sam_args(tmp_path), train_dataset=classification_data())
    trainer.train()
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("mode", ["zo", "lookback"])
def test_bandit_reward_is_each_arms_update_gradient_norm(tmp_path, mode):
    """The reward of a selected arm is ||grad||_2 over all of its tensors (block arms: several tensors each),
    read from the accumulated update gradients when the bandit is updated."""
    args = sam_args(tmp_path, sam_mode=mode, arm_granularity="block", selection_budget=0.5, max_steps=4,
                    gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=classification_data())
    update, seen = trainer.selector.update, []

    def spy(selected, rewards):
        expected = [torch.cat([p.grad.double().flatten() for p in trainer.arms[i].params if p.grad is not None]
                              or [torch.zeros(1, dtype=torch.float64)]).norm().item() for i in selected]
        seen.append((rewards.copy(), expected))
        return update(selected, rewards)

    trainer.selector.update = spy
    trainer.train()
    assert len(seen) == 4
    assert any(len(trainer.arms[i].params) > 1 for i in range(len(trainer.arms)))
    for rewards, expected in seen:
        assert rewards == pytest.approx(expected, rel=1e-5) and max(expected) > 0


def selections(tmp_path, seed):
    args = sam_args(tmp_path, max_steps=6, seed=seed)
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=classification_data())
    trainer.train()
    return trainer.history.counts


def test_same_seed_same_selection(tmp_path):
    first, second = selections(tmp_path / "a", 0), selections(tmp_path / "b", 0)
    assert first == second and len(first) == 6
    assert selections(tmp_path / "c", 1) != first


class GradCapture(TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


class RecordingSAMTrainer(SAMTrainer):
    """Records each micro-batch and its num_items_in_batch, for reference computations."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", []) + [({k: v.clone() for k, v in inputs.items()}, num_items_in_batch)]
        return super().training_step(model, inputs, num_items_in_batch)


def run_lm(tmp_path, rho, accumulation, batch_size):
    capture = GradCapture()
    model = tiny_llama()
    args = sam_args(tmp_path, sam_mode="sam", sam_rho=rho, layer_selection="all", max_steps=1, max_grad_norm=0,
                    per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                    train_sampling_strategy="sequential")
    trainer = RecordingSAMTrainer(model=model, args=args, train_dataset=lm_data(n=8), callbacks=[capture])
    trainer.train()
    return trainer, capture.grads[0]


def test_accumulation_with_rho_zero_equals_one_big_batch(tmp_path):
    _, accumulated = run_lm(tmp_path / "ga", 0.0, accumulation=4, batch_size=2)
    _, big = run_lm(tmp_path / "big", 0.0, accumulation=1, batch_size=8)
    assert accumulated.keys() == big.keys()
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=1e-6, rtol=1e-5, msg=name)


def test_accumulation_with_rho_sums_per_micro_batch_references(tmp_path):
    trainer, accumulated = run_lm(tmp_path, 0.05, accumulation=4, batch_size=2)
    reference = tiny_llama()
    params = list(reference.parameters())
    total = [torch.zeros_like(p) for p in params]
    for inputs, num_items in trainer.seen:
        g = torch.autograd.grad(reference(**inputs, num_items_in_batch=num_items).loss, params)
        norm = torch.cat([x.flatten() for x in g]).norm()
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(0.05 * gi / norm)
        perturbed = torch.autograd.grad(reference(**inputs, num_items_in_batch=num_items).loss, params)
        for t, gi in zip(total, perturbed):
            t += gi
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
    assert len(trainer.seen) == 4
    for (name, _), ref in zip(reference.named_parameters(), total):
        torch.testing.assert_close(accumulated[name], ref, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_on_cpu_runs_every_mode(tmp_path, mode):
    args = sam_args(tmp_path, sam_mode=mode, bf16=True, max_steps=3)
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=classification_data())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_bf16_weights_are_restored_exactly(tmp_path):
    model = tiny_bert(dropout=0.0).to(torch.bfloat16)
    for mode in ("zo", "sam", "asam"):
        trainer = one_step_trainer(tmp_path / mode, model, sam_mode=mode, zo_direction="gaussian")
        before = params_of(model)
        trainer.training_step(model, batch(classification_data()))
        assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()), mode
        model.zero_grad()


def test_logs_and_selection_history(tmp_path):
    args = sam_args(tmp_path, sam_mode="sam", max_steps=4, logging_steps=1)
    model = tiny_bert()
    trainer = SAMTrainer(model=model, args=args, train_dataset=classification_data())
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 4
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
    for log, counts in zip(logs, trainer.history.counts):
        for key in ("loss_perturbed", "sharpness", "selected_arms", "bandit_entropy"):
            assert key in log
        active = head + sum(arm.numel for arm, c in zip(trainer.arms, counts) if c)
        assert log["active_param_ratio"] == pytest.approx(active / total)
        assert log["selected_arms"] == sum(counts)
        assert log["sharpness"] == pytest.approx(log["loss_perturbed"] - log["loss"], abs=1e-5)
    with open(os.path.join(tmp_path, "selection_history.json")) as f:
        history = json.load(f)
    assert history["arm_names"] == [arm.name for arm in trainer.arms]
    assert len(history["counts"]) == 4 and len(history["probabilities"][0]) == len(trainer.arms)
    assert history["active_param_ratio"] == pytest.approx([log["active_param_ratio"] for log in logs], abs=1e-6)
    assert os.path.getsize(os.path.join(tmp_path, "selection_heatmap.png")) > 1000


def test_cosine_diagnostic_is_logged(tmp_path):
    args = sam_args(tmp_path, sam_mode="zo", zo_direction="gaussian", max_steps=2, sam_cosine_log_steps=1,
                    zo_num_directions=4)
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=classification_data())
    trainer.train()
    cosines = [log["ascent_cosine"] for log in trainer.state.log_history if "ascent_cosine" in log]
    assert len(cosines) == 2 and all(-1 <= c <= 1 for c in cosines)


@pytest.mark.parametrize("mode", ["sam", "asam"])
def test_rho_zero_trains_like_sam_mode_none_and_the_bandit_learns_from_the_update_gradient(tmp_path, mode):
    trainers = {}
    for sam_mode in ("none", mode):
        args = sam_args(tmp_path / sam_mode, sam_mode=sam_mode, sam_rho=0.0, bandit_lr=0.5, max_steps=4)
        trainers[sam_mode] = SAMTrainer(model=tiny_bert(), args=args, train_dataset=classification_data())
        trainers[sam_mode].train()
    probabilities = trainers[mode].selector.probabilities
    assert probabilities.max() - probabilities.min() > 0.01, "the bandit learned"
    assert probabilities.tolist() == trainers["none"].selector.probabilities.tolist()
    reference = params_of(trainers["none"].model)
    for name, value in params_of(trainers[mode].model).items():
        assert torch.equal(value, reference[name]), name


def test_lora_arms_have_a_nonzero_reward_while_b_is_still_zero(tmp_path):
    """At PEFT's init B = 0, so dL/dA = 0 exactly: an arm holding A alone would be punished for it. An arm is the
    adapted module (A and B), rewarded with ||(dL/dA, dL/dB)|| = ||dL/dB|| > 0."""
    args = sam_args(tmp_path, sam_mode="none", selection_budget=0.5, max_steps=1)
    trainer = SAMTrainer(model=lora(tiny_bert()), args=args, train_dataset=classification_data())
    update, seen = trainer.selector.update, []
    trainer.selector.update = lambda selected, rewards: seen.append((selected, rewards)) or update(selected, rewards)
    trainer.train()
    (selected, rewards), = seen
    assert len(selected) >= 2 and (rewards > 0).all()
    assert all(len(trainer.arms[i].params) == 2 for i in selected)


def test_cosine_diagnostic_skips_zero_order_ties(tmp_path):
    # zo_eps far below float32 resolution: theta +- eps u == theta, the two probe losses tie, g = 0, nothing moves.
    args = sam_args(tmp_path, sam_mode="zo", zo_direction="gaussian", zo_eps=1e-30, max_steps=2,
                    sam_cosine_log_steps=1)
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=classification_data())
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["perturbation_skipped"] for log in logs] == [1, 1]
    assert not any("ascent_cosine" in log for log in logs)


def test_half_precision_weights_warn_and_log_the_perturbation_actually_applied(tmp_path, caplog):
    """bf16 weights: epsilon's elements below bf16 spacing round away. A tiny rho is lost almost entirely, a large
    one arrives whole; the logged perturbation_norm = ||theta + epsilon - theta|| as applied shows which."""
    applied = {}
    for rho in (1e-4, 10.0):
        caplog.clear()
        with caplog.at_level("WARNING", logger="slsam_hf.trainer"):
            trainer = SAMTrainer(model=tiny_bert(dropout=0.0).to(torch.bfloat16), train_dataset=classification_data(),
                                 args=sam_args(tmp_path / str(rho), sam_mode="sam", layer_selection="all",
                                               sam_rho=rho, max_steps=2, learning_rate=0.0))
        assert "round away" in caplog.text and "torch.bfloat16" in caplog.text
        trainer.train()
        applied[rho] = [log["perturbation_norm"] for log in trainer.state.log_history if "perturbation_norm" in log]
    assert len(applied[1e-4]) == 2 and all(0 < n < 0.9e-4 for n in applied[1e-4])  # part of it rounded away
    assert all(n == pytest.approx(10.0, rel=0.02) for n in applied[10.0])
    caplog.clear()
    with caplog.at_level("WARNING", logger="slsam_hf.trainer"):
        trainer = SAMTrainer(model=tiny_bert(), train_dataset=classification_data(),
                             args=sam_args(tmp_path / "fp32", sam_mode="sam", max_steps=1))
    trainer.train()
    assert "round away" not in caplog.text
    assert not any("perturbation_norm" in log for log in trainer.state.log_history)
