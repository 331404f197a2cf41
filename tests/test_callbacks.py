"""SharpnessCallback: the figures at each evaluation are measure_sharpness of the model at that point."""

import pytest
from transformers import Trainer, default_data_collator

from conftest import classification_data, sam_args, tiny_bert
from slsam_hf import SAMTrainer, SharpnessCallback, measure_sharpness

KEYS = ("eval_sharpness_loss", "eval_ascent_sharpness", "eval_random_sharpness", "eval_hessian_top_eigenvalue")
OPTIONS = {"num_directions": 2, "hessian_iters": 3, "rho": 0.1}


@pytest.mark.parametrize("trainer_class", [Trainer, SAMTrainer])
def test_every_evaluation_carries_the_flatness_of_the_model(tmp_path, trainer_class):
    data, dev = classification_data(32), classification_data(12, seed=1)
    callback = SharpnessCallback(dev, batch_size=8, **OPTIONS)
    args = sam_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2)
    trainer = trainer_class(model=tiny_bert(), args=args, train_dataset=data, eval_dataset=dev, callbacks=[callback])
    trainer.train()
    records = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert [r["step"] for r in records] == [2, 4] and all(set(KEYS) <= set(r) for r in records)
    assert records[0]["eval_ascent_sharpness"] != records[1]["eval_ascent_sharpness"]  # measured anew each time

    metrics = trainer.evaluate()
    batches = [default_data_collator([dev[i] for i in range(start, min(start + 8, 12))]) for start in (0, 8)]
    expected = measure_sharpness(trainer.model, batches, **OPTIONS)  # independent batches, same model and options
    assert [metrics[k] for k in KEYS] == [expected[k] for k in
                                          ("loss", "ascent_sharpness", "random_sharpness", "hessian_top_eigenvalue")]
    assert trainer.state.log_history[-1]["eval_ascent_sharpness"] == expected["ascent_sharpness"]


def test_a_list_of_batches_is_used_as_given_and_bad_options_are_refused():
    batch = default_data_collator([classification_data(4)[i] for i in range(4)])
    assert SharpnessCallback([batch]).batches() == [batch]
    with pytest.raises(TypeError, match="hessian_iter"):
        SharpnessCallback([batch], hessian_iter=3)
    with pytest.raises(ValueError, match="batch_size"):
        SharpnessCallback([batch], batch_size=0)
