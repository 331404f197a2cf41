"""Trainer callbacks of slsam_hf (Hugging Face glue around the pure-torch modules)."""

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, TrainerCallback, default_data_collator

from .sharpness import measure_sharpness


class SharpnessCallback(TrainerCallback):
    """Adds the flatness of the model (`slsam_hf.sharpness.measure_sharpness`) to every evaluation:
    eval_sharpness_loss (the loss on these batches; eval_loss stays the evaluation set's), eval_ascent_sharpness,
    eval_random_sharpness and eval_hessian_top_eigenvalue. They are returned by `evaluate()` (so
    `metric_for_best_model` and early stopping can use them) and stored in that evaluation's `log_history` record
    (trainer_state.json); reporting integrations that already received the evaluation's log do not see them.

        trainer.add_callback(SharpnessCallback(eval_dataset.select(range(256)), batch_size=32))

    eval_data: a list of collated batches (dicts of tensors with labels), used as they are, or a dataset of
    examples, batched in order with `data_collator` (default: padding with the trainer's tokenizer if it has one,
    else `default_data_collator`). measure_kwargs: rho, num_directions, hessian_iters, seed of measure_sharpness.
    """

    def __init__(self, eval_data, batch_size: int = 8, data_collator=None, **measure_kwargs):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        unknown = set(measure_kwargs) - {"rho", "num_directions", "hessian_iters", "seed"}
        if unknown:
            raise TypeError(f"SharpnessCallback: unknown options {sorted(unknown)}")
        self.eval_data, self.batch_size, self.data_collator = eval_data, batch_size, data_collator
        self.measure_kwargs = measure_kwargs
        self._batches = None

    def batches(self, processing_class=None) -> list:
        """The measured batches, built once."""
        if self._batches is None:
            if isinstance(self.eval_data, list):
                self._batches = self.eval_data
            else:
                collate = self.data_collator or (DataCollatorWithPadding(processing_class)
                                                 if getattr(processing_class, "pad", None) else default_data_collator)
                self._batches = list(DataLoader(self.eval_data, batch_size=self.batch_size, collate_fn=collate))
        return self._batches

    def on_evaluate(self, args, state, control, model=None, processing_class=None, metrics=None, **kwargs):
        with torch.enable_grad():
            figures = measure_sharpness(model, self.batches(processing_class), **self.measure_kwargs)
        logs = {("eval_sharpness_loss" if key == "loss" else f"eval_{key}"): value
                for key, value in figures.items() if value is not None}
        if metrics is not None:
            metrics.update(logs)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(logs)
