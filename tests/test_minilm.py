"""End to end on the real pretrained MiniLM-L6 encoder and real GLUE (MRPC) data shipped in the repository."""

import csv
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer

from slsam_hf import SAMTrainer, SAMTrainingArguments
from slsam_hf.assets import MINILM, resolve_model

MRPC = os.path.join(os.path.dirname(__file__), "..", "data", "glue", "MRPC", "train.tsv")


@pytest.fixture(scope="module")
def mrpc():
    with open(MRPC, encoding="utf-8-sig") as f:  # the file starts with a BOM
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:64]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MINILM))
    encoded = tokenizer([r["#1 String"] for r in rows], [r["#2 String"] for r in rows], truncation=True,
                        max_length=64, padding="max_length")
    return Dataset.from_dict({**encoded, "labels": [int(r["Quality"]) for r in rows]})


def minilm():
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(resolve_model(MINILM), num_labels=2)


def args(tmp_path, **overrides):
    return SAMTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4,
                                learning_rate=5e-5, logging_steps=2, save_strategy="no", report_to="none",
                                use_cpu=True, disable_tqdm=True, **overrides)


def test_none_equals_stock_trainer_on_real_model(tmp_path, mrpc):
    stock, sam = minilm(), minilm()
    Trainer(model=stock, args=args(tmp_path / "a", sam_mode="none", layer_selection="all"), train_dataset=mrpc).train()
    SAMTrainer(model=sam, args=args(tmp_path / "b", sam_mode="none", layer_selection="all"), train_dataset=mrpc).train()
    for (name, p), q in zip(stock.named_parameters(), sam.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("overrides", [{}, {"sam_mode": "zo"}], ids=["default", "zo_probe"])
def test_sparse_modes_on_real_model(tmp_path, mrpc, overrides):
    """The default (the bandit's scaled sparse step, no perturbation) and the momentum probe on top of it."""
    model = minilm()
    trainer = SAMTrainer(model=model, args=args(tmp_path, **overrides), train_dataset=mrpc)
    # The classifier head is missing from the checkpoint: always selected; every pretrained tensor is an arm.
    assert trainer.always_selected.param_names == ["classifier.weight", "classifier.bias"]
    assert len(trainer.arms) == len(list(model.parameters())) - 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2
    for log in logs:
        assert 0.01 < log["active_param_ratio"] < 0.9
        assert log["loss_perturbed"] > 0 if overrides else "loss_perturbed" not in log
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"classifier.weight", "classifier.bias"} <= changed and len(changed) < len(before)
    assert os.path.isfile(tmp_path / "selection_history.json")
