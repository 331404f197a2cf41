"""Trainer features a drop-in user may have on (README, "Compatibility with `Trainer` features"): mid-training
evaluation and callbacks, load_best_model_at_end, gradient checkpointing, a second train()."""

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from conftest import classification_data, sam_args, tiny_bert
from slsam_hf import SAMTrainer


class FlagsAndWeights(TrainerCallback):
    """Records, outside the step, whether every trainable tensor has requires_grad=True, and the weights."""

    def __init__(self, trainable):
        self.trainable = trainable  # names of the tensors the user left trainable
        self.frozen_seen = []  # (event, step, names with requires_grad=False)
        self.weights = {}  # step -> state dict at on_step_end
        self.evaluated = {}  # step -> eval metrics

    def _check(self, event, state, model):
        frozen = sorted(n for n, p in model.named_parameters() if n in self.trainable and not p.requires_grad)
        self.frozen_seen.append((event, state.global_step, frozen))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._check("on_step_end", state, model)
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_log(self, args, state, control, model=None, **kwargs):
        self._check("on_log", state, model)

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self._check("on_substep_end", state, model)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        self._check("on_evaluate", state, model)
        self.evaluated[state.global_step] = dict(metrics)


def test_callbacks_and_mid_training_evaluation_see_the_model_as_the_user_made_it(tmp_path):
    """With bandit selection (budget 0.2: most tensors frozen inside each step) and gradient accumulation, every
    callback sees every trainable tensor with requires_grad=True, and an evaluation during training gives the metrics
    a stock Trainer gives on a copy of the weights of that step (so no perturbation is left on them)."""
    model = tiny_bert()
    model.bert.embeddings.word_embeddings.requires_grad_(False)  # the user's own choice: must stay frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    recorder = FlagsAndWeights(trainable)
    eval_data = classification_data(n=12, seed=1)
    args = sam_args(tmp_path, max_steps=4, gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=2,
                    per_device_eval_batch_size=4, selection_budget=0.2)
    trainer = SAMTrainer(model=model, args=args, train_dataset=classification_data(), eval_dataset=eval_data,
                         callbacks=[recorder])
    trainer.train()

    events = {event for event, _, _ in recorder.frozen_seen}
    assert {"on_step_end", "on_log", "on_substep_end", "on_evaluate"} <= events
    frozen_seen = [entry for entry in recorder.frozen_seen if entry[2]]
    assert not frozen_seen, f"frozen requires_grad flags seen outside the step: {frozen_seen[:3]}"
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad, "the user's frozen tensor stays frozen"

    assert sorted(recorder.evaluated) == [2, 4]
    stock_args = TrainingArguments(output_dir=str(tmp_path / "stock"), per_device_eval_batch_size=4,
                                   report_to="none", use_cpu=True, disable_tqdm=True)
    for step, metrics in recorder.evaluated.items():
        reference = tiny_bert()
        reference.load_state_dict(recorder.weights[step])
        expected = Trainer(model=reference, args=stock_args, eval_dataset=eval_data).evaluate()
        assert metrics["eval_loss"] == expected["eval_loss"], (step, metrics, expected)


def test_load_best_model_at_end_ends_with_the_best_checkpoints_weights(tmp_path):
    """Evaluation and checkpoints every 2 steps with bandit selection; the metric makes the first checkpoint the best,
    so the run must end with its weights, not the last step's."""
    from safetensors.torch import load_file

    evaluations = []

    def compute_metrics(prediction):
        evaluations.append(len(evaluations))
        return {"score": -float(len(evaluations))}  # each evaluation scores worse than the one before

    model = tiny_bert()
    args = sam_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                    load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True,
                    per_device_eval_batch_size=4)
    trainer = SAMTrainer(model=model, args=args, train_dataset=classification_data(),
                         eval_dataset=classification_data(n=8, seed=1), compute_metrics=compute_metrics)
    trainer.train()

    assert len(evaluations) == 3
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-6" / "model.safetensors"))
    weights = model.state_dict()
    assert any(not torch.equal(best[name], last[name]) for name in best), "steps 3-6 changed the weights"
    for name, tensor in best.items():
        assert torch.equal(weights[name], tensor), name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert not frozen, f"frozen after training: {frozen}"


def _two_step_weights(tmp_path, sam_mode, gradient_checkpointing):
    model = tiny_bert(dropout=0.0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args = sam_args(tmp_path, max_steps=2, sam_mode=sam_mode, selection_budget=0.2,
                    gradient_checkpointing=gradient_checkpointing)
    trainer = SAMTrainer(model=model, args=args, train_dataset=classification_data())
    trainer.train()
    assert model.is_gradient_checkpointing == gradient_checkpointing
    return before, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_checkpointing_with_selection_gives_the_same_update(tmp_path, monkeypatch):
    """gradient_checkpointing=True (non-reentrant, the default) recomputes the forward in the backward while the
    unselected tensors are frozen: the selected tensors above frozen ones get the same gradients, so the weights
    after two steps equal a run without checkpointing (dropout 0, same seed: same selection)."""
    import transformers.modeling_utils

    calls = []
    stock_checkpoint = transformers.modeling_utils.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return stock_checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)
    for sam_mode in ("zo", "sam"):
        before, plain = _two_step_weights(tmp_path / f"{sam_mode}-plain", sam_mode, False)
        assert not calls
        _, checkpointed = _two_step_weights(tmp_path / f"{sam_mode}-ckpt", sam_mode, True)
        assert calls and set(calls) == {False}, "the layers ran under non-reentrant checkpointing"
        calls.clear()
        moved = {n for n in before if not torch.equal(before[n], plain[n])}
        assert any(n.startswith("bert.encoder.layer.1.") for n in moved), sam_mode
        assert any(n.startswith("bert.encoder.layer.0.") for n in set(before) - moved), sam_mode
        for name in before:
            torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-6, msg=f"{sam_mode} {name}")


class FirstStepState(TrainerCallback):
    """What the trainer holds when a train() call begins its first step."""

    def __init__(self):
        self.trainer, self.seen = None, []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            t = self.trainer
            self.seen.append({
                "probabilities": t.selector.probabilities.copy(),
                "lookback": {k: v.clone() for k, v in t._lookback.items()},
                "optimizer_state": len(t.optimizer.state),
                "history_steps": list(t.history.steps),
                "window_steps": t._window["steps"],
            })


def test_a_second_train_starts_the_sam_state_afresh(tmp_path):
    """A second train() restarts the step count, schedule and log history; SAMTrainer restarts its own state with
    them: the bandit's probabilities, the lookback buffer, the selection history and the log window. The base
    optimizer is stock's, which keeps its moments."""
    recorder = FirstStepState()
    args = sam_args(tmp_path, max_steps=3, logging_steps=2, sam_mode="lookback", selection_budget=0.2)
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=classification_data(), callbacks=[recorder])
    recorder.trainer = trainer
    trainer.train()
    first = {"probabilities": trainer.selector.probabilities.copy(),
             "lookback": {k: v.clone() for k, v in trainer._lookback.items()},
             "history_steps": list(trainer.history.steps)}
    assert first["history_steps"] == [2, 3] and first["lookback"]
    assert trainer._window["steps"] == 1, "step 3 was not logged (logging_steps=2)"
    trainer.train()

    assert len(recorder.seen) == 2
    second = recorder.seen[1]
    assert second["optimizer_state"] > 0, "stock keeps the optimizer"
    assert not (first["probabilities"] == recorder.seen[0]["probabilities"]).all(), "the bandit learned in run 1"
    assert (second["probabilities"] == recorder.seen[0]["probabilities"]).all(), "run 2 starts from uniform"
    assert second["lookback"] == {}
    assert second["history_steps"] == [] and second["window_steps"] == 0
    assert trainer.history.steps == [2, 3] and sum(trainer.history.window_steps) == 3
    assert trainer.state.global_step == 3
