"""Faults and unsupported setups: non-finite probes and ascent gradients, loss scaling, unused arms, bad input."""

import numpy as np
import pytest
import torch
from conftest import classification_data, sam_args, tiny_bert
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from slsam_hf import SAMTrainer
from slsam_hf.trainer import SAMTrainerMixin


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(trainer_cls, tmp_path, model=None, scaler=None, **overrides):
    model = model or tiny_bert(dropout=0.0)
    trainer = trainer_cls(model=model, args=sam_args(tmp_path, **overrides), train_dataset=classification_data())
    if scaler is not None:  # simulated fp16 loss scaling on CPU: accelerate's backward, unscale and step use it
        trainer.accelerator.scaler = scaler
    trainer.train()
    return trainer


class NanProbe(SAMTrainer):
    """Every zero-order probe forward (eval mode) returns a NaN loss."""

    def compute_loss(self, model, inputs, **kwargs):
        loss = super().compute_loss(model, inputs, **kwargs)
        return loss * float("nan") if not model.training else loss


class InfAscent(SAMTrainer):
    """The first-order ascent pass (the first compute_loss of each micro-batch) returns an infinite loss."""

    calls = 0

    def compute_loss(self, model, inputs, **kwargs):
        loss = super().compute_loss(model, inputs, **kwargs)
        self.calls += 1
        return loss * float("inf") if self.calls % 2 == 1 else loss


@pytest.mark.parametrize("loss_scale", [None, 1024.0], ids=["fp32", "loss-scaled"])
@pytest.mark.parametrize("faulty, mode", [(NanProbe, "zo"), (InfAscent, "sam"), (InfAscent, "asam")])
def test_non_finite_probe_or_ascent_falls_back_to_a_plain_step(tmp_path, faulty, mode, loss_scale):
    scalers = [None, None] if loss_scale is None else [torch.amp.GradScaler("cpu", init_scale=loss_scale)
                                                       for _ in range(2)]
    stock = train(Trainer, tmp_path / "stock", scaler=scalers[0], max_steps=3)
    sam = train(faulty, tmp_path / "sam", scaler=scalers[1], sam_mode=mode, layer_selection="all", max_steps=3)
    stock_params, sam_params = params_of(stock.model), params_of(sam.model)
    for name in stock_params:
        assert torch.equal(stock_params[name], sam_params[name]), name
    assert sum(log.get("perturbation_skipped", 0) for log in sam.state.log_history) == 3
    if loss_scale is not None:
        assert scalers[0].get_scale() == scalers[1].get_scale()


def test_non_finite_probe_leaves_bandit_finite(tmp_path):
    trainer = train(NanProbe, tmp_path, sam_mode="zo", layer_selection="bandit", max_steps=4, bandit_lr=0.5)
    assert np.all(np.isfinite(trainer.selector.probabilities))
    assert trainer.selector.probabilities.sum() == pytest.approx(0.2 * len(trainer.arms))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


class Loud:
    """Multiplies the loss by 1e4, so that a loss scale of 2**127 overflows every gradient."""

    def compute_loss(self, model, inputs, **kwargs):
        return super().compute_loss(model, inputs, **kwargs) * 1e4


def test_overflowing_loss_scale_skips_perturbation_and_step_like_stock(tmp_path):
    """fp16-style loss scaling where every gradient overflows: SAMTrainer neither perturbs nor steps, and the
    scaler backs off exactly as under stock Trainer."""
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**127) for _ in range(2)]
    initial = params_of(tiny_bert(dropout=0.0))
    stock = train(type("LoudTrainer", (Loud, Trainer), {}), tmp_path / "stock", scaler=scalers[0], max_steps=2)
    sam = train(type("LoudSAM", (Loud, SAMTrainer), {}), tmp_path / "sam", scaler=scalers[1], sam_mode="sam",
                layer_selection="all", max_steps=2)
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**125
    for name, value in params_of(sam.model).items():
        assert torch.equal(value, initial[name]), name
        assert torch.equal(value, params_of(stock.model)[name]), name
    assert sum(log.get("perturbation_skipped", 0) for log in sam.state.log_history) == 2


def test_loss_scale_does_not_change_the_sam_step(tmp_path):
    """With a finite loss scale, SAM's direction is scale-invariant and gradients are unscaled before the step:
    the trajectory equals the unscaled one (to float tolerance)."""
    # No clipping: accelerate unscales before clipping only under real fp16, which this CPU cannot run.
    kwargs = dict(sam_mode="sam", layer_selection="all", max_steps=3, max_grad_norm=0)
    plain = train(SAMTrainer, tmp_path / "plain", **kwargs)
    scaled = train(SAMTrainer, tmp_path / "scaled", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0), **kwargs)
    for name, value in params_of(plain.model).items():
        torch.testing.assert_close(params_of(scaled.model)[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_selected_arm_without_gradient_keeps_bandit_bookkeeping(tmp_path):
    model = tiny_bert()
    model.unused = torch.nn.Linear(4, 4)  # a trainable tensor the forward never touches
    trainer = train(SAMTrainer, tmp_path, model=model, sam_mode="zo", selection_budget=0.5, bandit_lr=0.5,
                    max_steps=8)
    names = [arm.name for arm in trainer.arms]
    unused = names.index("unused.weight")
    assert any(counts[unused] for counts in trainer.history.counts), "the unused arm was never selected"
    probs = trainer.selector.probabilities
    assert np.all(np.isfinite(probs)) and probs.sum() == pytest.approx(0.5 * len(names))
    assert probs[unused] < 0.5, "zero reward must lower the unused arm's probability"
    assert model.unused.weight.grad is None


class Snapshots(TrainerCallback):
    """The classifier weight after every optimizer step."""

    def __init__(self):
        self.weights = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(model.classifier.weight.detach().clone())


@pytest.mark.parametrize("loss_scale", [None, 1024.0], ids=["fp32", "loss-scaled"])
@pytest.mark.parametrize("mode", ["none", "sam", "zo", "lookback"])
def test_step_whose_selected_arms_are_all_unused_changes_nothing(tmp_path, mode, loss_scale):
    """Selected arms the forward never reaches: the loss has no graph, yet the step runs (stock backward would
    raise), perturbs nothing and updates nothing; under fp16 loss scaling the scale is not backed off."""
    model = tiny_bert(dropout=0.0).requires_grad_(False)
    model.classifier.requires_grad_(True)
    model.unused = torch.nn.Linear(4, 4)
    initial = model.classifier.weight.detach().clone()
    snapshots = Snapshots()
    trainer = SAMTrainer(
        model=model, train_dataset=classification_data(), callbacks=[snapshots],
        args=sam_args(tmp_path, sam_mode=mode, layer_selection="random", selection_budget=0.25,
                      always_selected=["none"], max_steps=8),
    )
    scaler = None if loss_scale is None else torch.amp.GradScaler("cpu", init_scale=loss_scale)
    trainer.accelerator.scaler = scaler
    trainer.train()
    logs = [log for log in trainer.state.log_history if "active_param_ratio" in log]
    idle = [k for k, log in enumerate(logs) if log["active_param_ratio"] == 0]
    assert idle and len(idle) < len(logs), "the seed must draw both idle and working steps"
    before = [initial] + snapshots.weights[:-1]
    for k in idle:
        assert torch.equal(snapshots.weights[k], before[k]), f"step {k + 1} moved the classifier"
        if mode in ("sam", "zo"):
            assert logs[k]["perturbation_skipped"] == 1
    assert not torch.equal(snapshots.weights[-1], initial)
    assert model.unused.weight.grad is None
    if scaler is not None:
        assert scaler.get_scale() == loss_scale


@pytest.mark.parametrize("trainer_cls", [Trainer, SAMTrainer])
def test_a_loss_that_detaches_raises_the_stock_error(tmp_path, trainer_cls):
    """A custom loss without a graph is a user error, not a step whose drawn arms are all unused: SAMTrainer with
    selection raises stock backward's error too, instead of running no-op steps."""
    detached = lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum().detach()  # noqa: E731
    args = sam_args(tmp_path, layer_selection="bandit", max_steps=2)
    if trainer_cls is Trainer:
        args = TrainingArguments(**{k: getattr(args, k) for k in ("output_dir", "max_steps", "use_cpu", "report_to")})
    trainer = trainer_cls(model=tiny_bert(), args=args, train_dataset=classification_data(),
                          compute_loss_func=detached)
    with pytest.raises(RuntimeError, match="does not require grad"):
        trainer.train()


def test_needs_sam_training_arguments(tmp_path):
    with pytest.raises(TypeError, match="SAMTrainingArguments"):
        SAMTrainer(model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))


def test_model_without_trainable_parameters(tmp_path):
    model = tiny_bert().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        SAMTrainer(model=model, args=sam_args(tmp_path))


def test_selection_with_every_tensor_always_selected(tmp_path):
    with pytest.raises(ValueError, match="no arms to choose from"):
        SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, always_selected=[".*"]))
    SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, always_selected=[".*"], layer_selection="all"))


def pretend(attribute):
    """A SAMTrainer whose accelerator set-up reports `attribute` (DeepSpeed / FSDP cannot start on this CPU)."""

    class Pretending(SAMTrainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            setattr(self, attribute, True)

    return Pretending


def test_deepspeed_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="DeepSpeed"):
        pretend("is_deepspeed_enabled")(model=tiny_bert(), args=sam_args(tmp_path))


def test_fsdp1_is_refused_unless_plain_training(tmp_path):
    """FSDP2 runs every mode (test_fsdp.py); FSDP1's flattened parameters cannot be perturbed or frozen per tensor."""
    with pytest.raises(ValueError, match="FSDP1 only with sam_mode='none'"):
        pretend("is_fsdp_enabled")(model=tiny_bert(), args=sam_args(tmp_path))
    pretend("is_fsdp_enabled")(model=tiny_bert(), args=sam_args(tmp_path, sam_mode="none", layer_selection="all"))


def test_data_parallel_is_refused(tmp_path):
    args = sam_args(tmp_path)
    args._n_gpu = 2  # what TrainingArguments reports for one process on a machine with two GPUs
    with pytest.raises(ValueError, match="does not support torch.nn.DataParallel"):
        SAMTrainer(model=tiny_bert(), args=args)


class OutOfMemoryOnce(Trainer):
    """The stock training step (SAMTrainer's update pass, run at theta + e) raises an out-of-memory error on its
    first call with a batch of 8 rows, the kind `auto_find_batch_size` catches."""

    raised = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.raised and inputs["input_ids"].shape[0] == 8:
            self.raised = True
            raise RuntimeError("CUDA out of memory. (simulated)")
        return super().training_step(model, inputs, num_items_in_batch)


SAMOutOfMemoryOnce = type("SAMOutOfMemoryOnce", (SAMTrainerMixin, OutOfMemoryOnce), {})


@pytest.mark.parametrize("mode", ["sam", "asam", "zo"])
def test_exception_in_the_update_pass_leaves_the_model_as_it_was(tmp_path, mode):
    model = tiny_bert(dropout=0.0)
    args = sam_args(tmp_path, sam_mode=mode, zo_direction="gaussian", per_device_train_batch_size=8)
    trainer = SAMOutOfMemoryOnce(model=model, args=args, train_dataset=classification_data())
    trainer.current_gradient_accumulation_steps = 1
    before = params_of(model)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.training_step(model, default_data_collator([classification_data()[i] for i in range(8)]))
    assert trainer._selected.size < len(trainer.arms), "the step had frozen some arms"
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), f"{name} left perturbed"
        assert p.requires_grad, f"{name} left frozen"


def test_auto_find_batch_size_restarts_from_the_unperturbed_weights(tmp_path):
    """An out-of-memory error in the first update pass at batch size 8: auto_find_batch_size restarts with a
    smaller batch, and the run equals one started with that batch size."""
    options = dict(sam_mode="sam", max_steps=3, max_grad_norm=0)
    restarted = train(SAMOutOfMemoryOnce, tmp_path / "restarted", per_device_train_batch_size=8,
                      auto_find_batch_size=True, **options)
    assert restarted.raised and restarted._train_batch_size < 8
    direct = train(SAMTrainer, tmp_path / "direct", per_device_train_batch_size=restarted._train_batch_size,
                   **options)
    for name, value in params_of(direct.model).items():
        assert torch.equal(params_of(restarted.model)[name], value), name


@pytest.mark.parametrize("device_map", [{"bert": 0, "classifier": 1}, {"bert": "cpu", "classifier": "disk"}])
def test_model_spread_over_several_devices_is_refused(tmp_path, device_map):
    model = tiny_bert()
    model.hf_device_map = device_map  # what from_pretrained(device_map=...) sets
    with pytest.raises(ValueError, match="spread over several devices"):
        SAMTrainer(model=model, args=sam_args(tmp_path))
    model.hf_device_map = {"": "cpu"}
    SAMTrainer(model=model, args=sam_args(tmp_path))


def test_torch_compile_with_layer_selection_is_refused(tmp_path):
    """torch.compile guards on requires_grad: every new selection recompiles (8 graphs in 12 steps on tiny BERT)."""
    with pytest.raises(ValueError, match="torch_compile=True cannot be combined with layer_selection='bandit'"):
        SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, torch_compile=True))
    SAMTrainer(model=tiny_bert(), args=sam_args(tmp_path, torch_compile=True, layer_selection="all"))
