"""recipes/finetune_llm.py launched with `accelerate launch` as a user would (offline) on the real SmolLM2-135M-Instruct
and the shipped Alpaca data: report figures, saved adapter / full model, and load-back giving the same held-out loss."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from slsam_hf.assets import SMOLLM2, resolve_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import eval_llm  # noqa: E402

SHORT_RUN = ["--max_seq_length", "64", "--heldout_size", "4", "--per_device_train_batch_size", "2",
             "--logging_steps", "1", "--sample_max_new_tokens", "4", "--disable_tqdm", "true"]


def launch(output_dir: Path, *args: str) -> dict:
    # One thread: on a shared 2-core machine, two OpenMP threads per process stall behind any other busy process.
    command = ["accelerate", "launch", "--num_processes", "1", "--num_cpu_threads_per_process", "1", "--cpu",
               str(ROOT / "recipes" / "finetune_llm.py"),
               *SHORT_RUN, "--output_dir", str(output_dir), *args]
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         cwd=output_dir.parent, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "finetune_llm report" in run.stdout
    return json.loads((output_dir / "finetune_report.json").read_text())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("finetune_llm") / "lora"
    report = launch(output_dir, "--max_steps", "3", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
                    "--eval_benchmarks", "arc_easy", "--eval_limit", "4")
    return output_dir, report


def heldout_of_run(tokenizer):
    """The run's held-out set, rebuilt independently of the recipe with the same split and truncation."""
    data_args = eval_llm.DataArguments(heldout_size=4, max_seq_length=64)
    records = eval_llm.split_heldout(eval_llm.load_records(data_args), 4, seed=42)[1]
    return eval_llm.tokenize_records(records, tokenizer, data_args)


def finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def test_lora_run_reports_loss_curve_heldout_and_sam_figures(lora_run):
    _, report = lora_run
    assert report["steps"] == 3 and report["use_lora"]
    assert 0 < report["heldout_records"] <= 4 and 0 < report["train_records"] <= 999 - 4
    loss = report["train_loss"]
    assert [step for step, _ in loss["logged"]] == [1, 2, 3]
    assert loss["first"] == loss["logged"][0][1] and loss["last"] == loss["logged"][-1][1]
    assert loss["min"] == min(value for _, value in loss["logged"]) and all(finite(v) for _, v in loss["logged"])
    before, after = report["heldout_before"], report["heldout_after"]
    for figures in (before, after):
        assert finite(figures["loss"]) and figures["perplexity"] == pytest.approx(math.exp(figures["loss"]))
        assert figures["tokens"] > 0 and isinstance(figures["sample"], str)
    assert after["loss"] != before["loss"], "three LoRA steps left the held-out loss unchanged"
    sam = report["sam"]
    assert sam["sam_mode"] == "none" and sam["layer_selection"] == "bandit"  # the package defaults
    assert sam["arms"] == 30 * 2  # 30 layers x (q_proj, v_proj), each arm its module's lora_A and lora_B
    assert 0 < sam["active_param_ratio"] <= 1 and 0 < sam["selected_arms"] < sam["arms"]
    assert sam["mean_loss_perturbed"] is None and sam["mean_sharpness"] is None  # the default perturbs nothing
    assert 0 <= report["benchmarks"]["arc_easy"]["acc,none"] <= 1
    assert report["prompt"].endswith("<|im_start|>assistant\n")


def test_lora_adapter_loads_back_with_the_same_heldout_loss(lora_run):
    output_dir, report = lora_run
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "selection_history.json",
                 "selection_heatmap.png"):
        assert (output_dir / name).is_file(), name
    card = (output_dir / "README.md").read_text()
    assert "fine-tuned version of [HuggingFaceTB/SmolLM2-135M-Instruct]" in card and "alpaca_en_demo.json" in card
    assert "- sam\n" in card and "library_name: peft" in card
    assert "budget 0.2: 12.0 of 60 arms" in card and "most-selected blocks" in card
    assert not (output_dir / "model.safetensors").exists()
    tokenizer = eval_llm.load_tokenizer(str(output_dir))
    heldout = heldout_of_run(tokenizer)
    assert len(heldout) == report["heldout_records"]
    base = AutoModelForCausalLM.from_pretrained(resolve_model(SMOLLM2))
    base_loss = eval_llm.heldout_loss(base, heldout, tokenizer)["loss"]
    assert base_loss == pytest.approx(report["heldout_before"]["loss"], rel=1e-4)  # LoRA starts as the identity
    adapted = PeftModel.from_pretrained(base, output_dir)
    assert eval_llm.heldout_loss(adapted, heldout, tokenizer)["loss"] == pytest.approx(
        report["heldout_after"]["loss"], rel=1e-4)
    via_auto = AutoModelForCausalLM.from_pretrained(output_dir)  # the base named in adapter_config.json + adapter
    assert eval_llm.heldout_loss(via_auto, heldout, tokenizer)["loss"] == pytest.approx(
        report["heldout_after"]["loss"], rel=1e-4)


def test_full_finetuning_saves_a_model_that_loads_back(tmp_path):
    output_dir = tmp_path / "full"
    report = launch(output_dir, "--no_use_lora", "--max_steps", "2", "--learning_rate", "1e-4",
                    "--no_completion_only_loss", "--use_chat_template", "false")
    assert not report["use_lora"] and report["steps"] == 2 and not (output_dir / "adapter_config.json").exists()
    assert report["prompt"].startswith("Below is an instruction")
    assert report["sam"]["arms"] == 272  # every tensor of the model (embeddings tied to the output head)
    tokenizer = eval_llm.load_tokenizer(str(output_dir))
    data_args = eval_llm.DataArguments(heldout_size=4, max_seq_length=64, use_chat_template=False,
                                       completion_only_loss=False)
    records = eval_llm.split_heldout(eval_llm.load_records(data_args), 4, seed=42)[1]
    heldout = eval_llm.tokenize_records(records, tokenizer, data_args)
    loaded = AutoModelForCausalLM.from_pretrained(output_dir)
    assert eval_llm.heldout_loss(loaded, heldout, tokenizer)["loss"] == pytest.approx(
        report["heldout_after"]["loss"], rel=1e-4)
    assert report["heldout_after"]["loss"] != report["heldout_before"]["loss"]
