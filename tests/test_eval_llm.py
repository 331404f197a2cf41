"""recipes/eval_llm.py against direct computations: choice log-likelihoods (forward, log_softmax, sum over the
continuation tokens) and the acc / acc_norm / LAMBADA figures they imply, held-out loss and perplexity; and the
command line on a tiny model with a LoRA adapter."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from slsam_hf.assets import SMOLLM2, resolve_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import eval_llm  # noqa: E402

LLM_EVAL = ROOT / "data" / "llm_eval"
N_ITEMS = 6


@pytest.fixture(scope="module")
def tokenizer():
    return eval_llm.load_tokenizer(resolve_model(SMOLLM2))


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random Llama over the real SmolLM2 vocabulary; a wide init makes the choices' scores differ clearly."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.3, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def first_rows(path: Path, n: int = N_ITEMS) -> list[dict]:
    with open(path) as f:
        return [json.loads(next(f)) for _ in range(n)]


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation tokens | context) and whether each was the argmax: one direct forward pass.
    The continuation's tokens are those of context + continuation after the context's own tokens."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    target = torch.tensor(whole_ids[len(context_ids):])
    logprobs = torch.log_softmax(model(torch.tensor([whole_ids])).logits[0].double(), dim=-1)
    predicted = logprobs[len(context_ids) - 1: -1]
    return float(predicted.gather(1, target[:, None]).sum()), bool((predicted.argmax(-1) == target).all())


def hand_items(name: str) -> list[tuple[list[str], list[str], int]]:
    """(contexts, continuations, gold) per item, written from each file's format and lm-eval's task prompts."""
    items = []
    if name == "arc_easy":
        for row in first_rows(LLM_EVAL / "arc_easy" / "test.jsonl"):
            choices = row["choices"]["text"]
            context = f"Question: {row['question']}\nAnswer:"
            items.append(([context] * len(choices), [" " + c for c in choices],
                          row["choices"]["label"].index(row["answerKey"])))
    elif name == "piqa":
        for row in first_rows(LLM_EVAL / "piqa" / "valid_with_labels.jsonl"):
            items.append(([f"Question: {row['goal']}\nAnswer:"] * 2, [" " + row["sol1"], " " + row["sol2"]],
                          row["label"]))
    elif name == "winogrande":
        for row in first_rows(LLM_EVAL / "winogrande" / "winogrande_dev.llmfoundry.jsonl"):
            items.append((row["context_options"], [" " + row["continuation"]] * 2, row["gold"]))
    return items


def reported_lls(results: dict, name: str) -> np.ndarray:
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    return np.array([[response[0] for response in sample["filtered_resps"]] for sample in samples])


def test_multiple_choice_scores_match_direct_loglikelihoods(model, tokenizer):
    names = ["arc_easy", "piqa", "winogrande"]
    results = eval_llm.evaluate_benchmarks(model, tokenizer, names, limit=N_ITEMS, batch_size=4, log_samples=True)
    for name in names:
        items = hand_items(name)
        lls = np.array([[loglikelihood(model, tokenizer, ctx, cont)[0] for ctx, cont in zip(*item[:2], strict=True)]
                        for item in items])
        np.testing.assert_allclose(reported_lls(results, name), lls, rtol=1e-4, err_msg=name)
        gold = np.array([item[2] for item in items])
        metrics = results["results"][name]
        assert metrics["acc,none"] == pytest.approx(np.mean(lls.argmax(1) == gold)), name
        if name != "winogrande":  # acc_norm: log-likelihood per character of the choice (no leading space)
            lengths = np.array([[len(cont) - 1 for cont in item[1]] for item in items])
            assert metrics["acc_norm,none"] == pytest.approx(np.mean((lls / lengths).argmax(1) == gold)), name
        assert len(set(lls.argmax(1))) > 1 or name == "winogrande", "degenerate test: one choice always wins"


def test_lambada_last_word_accuracy_and_perplexity(model, tokenizer):
    results = eval_llm.evaluate_benchmarks(model, tokenizer, ["lambada_openai"], limit=N_ITEMS, batch_size=4)
    scored = []
    for row in first_rows(LLM_EVAL / "lambada_openai" / "lambada_test.jsonl"):
        context, word = row["text"].rsplit(" ", 1)
        scored.append(loglikelihood(model, tokenizer, context, " " + word))
    lls, greedy = zip(*scored, strict=True)
    metrics = results["results"]["lambada_openai"]
    assert metrics["perplexity,none"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-4)
    assert metrics["acc,none"] == pytest.approx(np.mean(greedy))


def test_every_shipped_benchmark_builds_its_documents(tokenizer):
    """Each task config reads its file offline and turns the first item into well-formed requests."""
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_defaults=False).load([eval_llm.task_config(n) for n in eval_llm.BENCHMARKS])["tasks"]
    assert set(tasks) == set(eval_llm.BENCHMARKS)
    for name, task in tasks.items():
        doc = task.test_docs()[0]
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            assert len(choices) >= 2 and 0 <= gold < len(choices) and all(choices), name
    assert tasks["boolq"].doc_to_text(tasks["boolq"].test_docs()[0]).endswith("?\nAnswer:")
    with pytest.raises(ValueError, match="unknown benchmark"):
        eval_llm.benchmark_names("arc_easy,mmlu")


def heldout_set(tokenizer, **overrides):
    data_args = eval_llm.DataArguments(**{"heldout_size": 5, "max_seq_length": 96, **overrides})
    records = eval_llm.split_heldout(eval_llm.load_records(data_args), data_args.heldout_size, seed=42)[1]
    return records, eval_llm.tokenize_records(records, tokenizer, data_args)


@torch.no_grad()
def direct_loss(model, tokenized) -> float:
    """Token-weighted NLL over the label tokens, one unpadded sequence at a time."""
    total, count = 0.0, 0
    for row in tokenized:
        logprobs = torch.log_softmax(model(torch.tensor([row["input_ids"]])).logits[0].double(), dim=-1)
        for position, label in enumerate(row["labels"][1:]):
            if label != -100:
                total -= float(logprobs[position, label])
                count += 1
    return total / count


def test_heldout_loss_and_completion_only_labels(model, tokenizer):
    records, tokenized = heldout_set(tokenizer)
    assert len(tokenized) == len(records)
    result = eval_llm.heldout_loss(model, tokenized, tokenizer, batch_size=2)
    expected = direct_loss(model, tokenized)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    prompt, _ = eval_llm.prompt_and_completion(records[0], tokenizer, use_chat_template=True)
    prompt_ids = eval_llm.encode_prompt(prompt, tokenizer, use_chat_template=True)
    assert prompt.endswith("<|im_start|>assistant\n") and records[0]["instruction"] in prompt
    labels = tokenized[0]["labels"]
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids) and -100 not in labels[len(prompt_ids):]
    assert tokenized[0]["input_ids"][: len(prompt_ids)] == prompt_ids
    _, every_token = heldout_set(tokenizer, completion_only_loss=False, use_chat_template=False)
    assert every_token[0]["labels"] == every_token[0]["input_ids"]
    assert tokenizer.decode(every_token[0]["input_ids"]).startswith("Below is an instruction")


def test_command_line_with_lora_adapter(model, tokenizer, tmp_path):
    base_dir, adapter_dir, out_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(1)
    lora = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(adapter_dir)
    command = [sys.executable, str(ROOT / "recipes" / "eval_llm.py"), "--model_name_or_path", str(base_dir),
               "--adapter_path", str(adapter_dir), "--benchmarks", "arc_easy", "--limit", "3",
               "--heldout_size", "5", "--max_seq_length", "96", "--output_dir", str(out_dir)]
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "|arc_easy" in run.stdout and "held-out loss" in run.stdout
    report = json.loads((out_dir / "eval_results.json").read_text())
    _, tokenized = heldout_set(tokenizer)
    adapted = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    expected = direct_loss(adapted, tokenized)
    assert expected != pytest.approx(direct_loss(model, tokenized), rel=1e-3), "the adapter changes nothing"
    assert report["heldout"]["loss"] == pytest.approx(expected, rel=1e-4)
    assert 0 <= report["benchmarks"]["arc_easy"]["acc,none"] <= 1 and report["limit"] == 3


def test_truncation_that_leaves_no_response_token_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="raise --max_seq_length"):
        heldout_set(tokenizer, max_seq_length=8)
