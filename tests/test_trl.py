"""The mixin on TRL's SFTTrainer: SAM's extra forwards must not count TRL's per-call token metrics twice."""

from dataclasses import dataclass

import pytest
import torch
from conftest import lm_data, tiny_llama

trl = pytest.importorskip("trl")
from transformers import AutoTokenizer  # noqa: E402

from slsam_hf import SAMTrainerMixin, SAMTrainingArguments  # noqa: E402
from slsam_hf.assets import SMOLLM2, resolve_model  # noqa: E402


@dataclass
class SAMSFTConfig(SAMTrainingArguments, trl.SFTConfig):
    pass


class SAMSFTTrainer(SAMTrainerMixin, trl.SFTTrainer):
    pass


def run(trainer_cls, tmp_path, **overrides):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    data = lm_data(n=16, length=12).remove_columns(["labels", "attention_mask"])
    args = SAMSFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, **overrides)
    trainer = trainer_cls(model=tiny_llama(), args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return trainer


@pytest.mark.parametrize("mode", ["zo", "sam"])
def test_sft_metrics_counted_once(tmp_path, mode):
    stock = run(trl.SFTTrainer, tmp_path / "stock", sam_mode="none", layer_selection="all")
    sam = run(SAMSFTTrainer, tmp_path / "sam", sam_mode=mode, zo_direction="gaussian", zo_num_directions=2)
    assert sam._total_train_tokens == stock._total_train_tokens > 0
    stock_logs = [log for log in stock.state.log_history if "loss" in log]
    sam_logs = [log for log in sam.state.log_history if "loss" in log]
    assert [log["num_tokens"] for log in sam_logs] == [log["num_tokens"] for log in stock_logs]
    assert all(0 <= log["mean_token_accuracy"] <= 1 and "loss_perturbed" in log for log in sam_logs)
    assert not any(sam._metrics["eval"].values()), "probe forwards leaked into TRL's eval metrics"
    assert all(torch.isfinite(p).all() for p in sam.model.parameters())
