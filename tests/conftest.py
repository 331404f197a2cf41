"""Shared fixtures: tiny from-config models and synthetic datasets, so most tests run in seconds on a CPU."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from slsam_hf import SAMTrainingArguments

VOCAB = 64
TESTS = Path(__file__).resolve().parent


def tiny_bert(seed: int = 0, dropout: float = 0.1) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def classification_data(n: int = 32, length: int = 8, seed: int = 0) -> Dataset:
    """Random token sequences; the label is whether token 1 occurs more often than token 2 (learnable)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[:, 1] = torch.where(labels == 1, 1, 2)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": labels.tolist()})


def lm_data(n: int = 16, length: int = 12, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": ids.tolist()})


def sam_args(tmp_path, **overrides) -> SAMTrainingArguments:
    """Small, deterministic CPU settings; no checkpoints, no reporting. The zero-order probe unless overridden: the
    most involved step (the package default, sam_mode='none', is what test_minilm and test_training_args check)."""
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=5,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, sam_mode="zo",
    )
    defaults.update(overrides)
    return SAMTrainingArguments(**defaults)


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path


def launch(worker: Path, out: Path) -> Path:
    """Runs `worker OUT` on 2 CPU processes over gloo (`accelerate launch`, accelerate_configs/cpu_2proc.yaml)."""
    pythonpath = os.pathsep.join(filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}
    config = TESTS.parent / "accelerate_configs" / "cpu_2proc.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(worker), str(out)]
    # 30 min: the FSDP2 worker took over 10 on 2 busy cores
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"worker failed:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    return out


@pytest.fixture(scope="session")
def launched(tmp_path_factory):
    """Output folder of one 2-process DDP run of tests/distributed_worker.py (all scenarios in one process group):
    test_distributed.py checks it, test_fsdp.py compares FSDP2 runs with it."""
    return launch(TESTS / "distributed_worker.py", tmp_path_factory.mktemp("ddp"))
