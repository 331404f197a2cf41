"""Evaluate a causal LM: held-out loss / perplexity on instruction or text data, and multiple-choice benchmarks.

The benchmarks run on EleutherAI's lm-evaluation-harness with task definitions pointing at the files shipped in
data/llm_eval (nothing is downloaded): log-likelihood of each choice given the context, `acc` and `acc_norm`
(choice log-likelihood divided by the choice's length); LAMBADA: last-word accuracy and perplexity.

    python recipes/eval_llm.py                                   # SmolLM2-135M-Instruct, arc_easy + piqa, 200 items
    python recipes/eval_llm.py --model_name_or_path smollm2-135m-instruct --adapter_path outputs/finetune_llm \\
        --benchmarks arc_easy,arc_challenge,hellaswag,piqa,boolq,winogrande,openbookqa,lambada_openai --limit 500
"""

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset, load_dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, HfArgumentParser

from slsam_hf.assets import SMOLLM2, resolve_model

logger = logging.getLogger(__name__)
DATA = Path(__file__).resolve().parents[1] / "data"
ALPACA_DEMO = DATA / "instruct" / "alpaca_en_demo.json"
ALPACA_PROMPT = (  # Stanford Alpaca's prompt, for tokenizers without a chat template
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n"
)


# ------------------------------------------------------------------------------------------------ benchmarks

ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
PERPLEXITY = {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}
ARC = {
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
    "metric_list": [ACC, ACC_NORM],
}


def clean_hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag clean-up of WikiHow artifacts."""
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


def clean_hellaswag(docs: Dataset) -> Dataset:
    return docs.map(lambda doc: {"query": clean_hellaswag_text(doc["query"]),
                                 "endings": [clean_hellaswag_text(e) for e in doc["endings"]]})


# The prompts, targets and metrics of lm-eval's built-in tasks of the same names, on the shipped files.
BENCHMARKS = {
    "arc_easy": {"file": "arc_easy/test.jsonl", **ARC},
    "arc_challenge": {"file": "arc_challenge/test.jsonl", **ARC},
    "hellaswag": {
        "file": "hellaswag/hellaswag_val.klosax.jsonl",
        "process_docs": clean_hellaswag,
        "doc_to_text": "{{query}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": "endings",
        "metric_list": [ACC, ACC_NORM],
    },
    "piqa": {
        "file": "piqa/valid_with_labels.jsonl",
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "metric_list": [ACC, ACC_NORM],
    },
    "boolq": {
        "file": "boolq/validation.jsonl",
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": ["no", "yes"],
        "metric_list": [ACC],
    },
    "winogrande": {  # the two options differ in the context; the same continuation is scored after each
        "file": "winogrande/winogrande_dev.llmfoundry.jsonl",
        "doc_to_text": "gold",
        "doc_to_target": "continuation",
        "doc_to_choice": "context_options",
        "metric_list": [ACC],
    },
    "openbookqa": {
        "file": "openbookqa/test.jsonl",
        "doc_to_text": "{{question.stem}}",
        "doc_to_target": "{{(question.choices | map(attribute='label') | list).index(answerKey.lstrip())}}",
        "doc_to_choice": "{{question.choices | map(attribute='text') | list}}",
        "metric_list": [ACC, ACC_NORM],
    },
    "lambada_openai": {
        "file": "lambada_openai/lambada_test.jsonl",
        "output_type": "loglikelihood",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [PERPLEXITY, ACC],
    },
}


@dataclass
class DataArguments:
    """Instruction or text data, and how records become token sequences (shared by finetune_llm.py)."""

    data_file: str = field(
        default=str(ALPACA_DEMO),
        metadata={"help": "Local .json/.jsonl (Alpaca records instruction/input/output, chat `messages`, or "
                          "`text`) or .txt file (one text per line). Ignored when --dataset_name is given."},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the Hugging Face Hub (or a local dataset folder)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    dataset_split: str = field(default="train", metadata={"help": "The Hub dataset's split to read records from."})
    heldout_size: int = field(
        default=32,
        metadata={"help": "Records held out from training, drawn with --seed (finetune_llm.py and eval_llm.py draw "
                          "the same ones). In eval_llm.py, 0 evaluates every record."},
    )
    max_seq_length: int = field(default=128, metadata={"help": "Sequences are truncated to this many tokens."})
    use_chat_template: bool | None = field(
        default=None,
        metadata={"help": "true / false: format instruction records with the tokenizer's chat template, or else "
                          "with the Alpaca prompt. Default: true when the tokenizer has a chat template."},
    )
    completion_only_loss: bool = field(
        default=True,
        metadata={"help": "Loss on the response tokens only (labels -100 on the prompt); --no_completion_only_loss "
                          "trains and evaluates on every token."},
    )


@dataclass
class EvalArguments:
    model_name_or_path: str = field(
        default=SMOLLM2,
        metadata={"help": "Base or fine-tuned model: a Hub name, a local folder, or the offline alias "
                          f"'{SMOLLM2}'. A folder holding a PEFT adapter loads its base model with it."},
    )
    adapter_path: str | None = field(
        default=None, metadata={"help": "A PEFT (LoRA) adapter folder to apply to --model_name_or_path."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    benchmarks: str = field(
        default="arc_easy,piqa",
        metadata={"help": f"Comma-separated benchmarks from data/llm_eval ('' for none): {', '.join(BENCHMARKS)}."},
    )
    limit: int = field(default=200, metadata={"help": "Items per benchmark (the first N); 0: all."})
    eval_heldout: bool = field(
        default=True, metadata={"help": "Held-out loss / perplexity on the data file (--no_eval_heldout skips it)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    seed: int = field(default=42, metadata={"help": "Seed of the held-out split (the training seed)."})
    output_dir: str = field(default="outputs/eval_llm", metadata={"help": "Where eval_results.json is written."})
    log_samples: bool = field(
        default=False, metadata={"help": "Also write every item's log-likelihoods to eval_results.json."}
    )


def benchmark_names(spec: str) -> list[str]:
    """`'arc_easy, piqa'` -> ['arc_easy', 'piqa'], with a clear error for an unknown name."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    return names


def task_config(name: str) -> dict:
    """An lm-eval task config (dict form of a task YAML) reading the shipped file by its absolute path."""
    config = {key: value for key, value in BENCHMARKS[name].items() if key != "file"}
    config.setdefault("output_type", "multiple_choice")
    data_file = DATA / "llm_eval" / BENCHMARKS[name]["file"]
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", **config}


def evaluate_benchmarks(model, tokenizer, names: list[str], limit=None, batch_size=8, log_samples=False) -> dict:
    """Zero-shot lm-eval run of `names` on an in-memory model; prints lm-eval's table, returns `simple_evaluate`'s
    output (per-benchmark metrics under "results", per-item log-likelihoods under "samples" with `log_samples`)."""
    # lm-eval is an optional dependency (`pip install lm-eval`): imported only when benchmarks are asked for.
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    if hasattr(model, "get_base_model"):  # a PeftModel: the wrapped transformers model, LoRA layers included
        model = model.get_base_model()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm, tasks=[task_config(name) for name in names], limit=limit, log_samples=log_samples,
        task_manager=TaskManager(include_defaults=False),
    )
    print(make_table(results))
    return results


def write_report(report: dict, output_dir: str, name: str) -> str:
    """Write `report` as JSON to output_dir/name; returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    return path


# ------------------------------------------------------------------------------------- held-out loss

def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_records(data_args: DataArguments) -> Dataset:
    """The records of --dataset_name (Hub) or --data_file (json / jsonl / txt), through `load_dataset`."""
    if data_args.dataset_name:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, split=data_args.dataset_split)
    path = Path(data_args.data_file)
    builder = {".json": "json", ".jsonl": "json", ".txt": "text"}.get(path.suffix)
    if builder is None:
        raise ValueError(f"--data_file must end in .json, .jsonl or .txt, got {path}")
    if not path.is_file():
        raise FileNotFoundError(f"--data_file {path} does not exist")
    records = load_dataset(builder, data_files=str(path.resolve()), split="train")
    return records.filter(lambda r: r["text"].strip() != "") if builder == "text" else records


def split_heldout(records: Dataset, size: int, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held-out): `size` records drawn with `seed`, the same in finetune_llm.py and eval_llm.py."""
    if not 0 < size < len(records):
        raise ValueError(f"heldout_size must be in [1, {len(records) - 1}] for {len(records)} records, got {size}")
    split = records.train_test_split(test_size=size, seed=seed)
    return split["train"], split["test"]


def prompt_and_completion(record: dict, tokenizer, use_chat_template: bool) -> tuple[str, str]:
    """A record as (prompt, completion) text. Alpaca (instruction/input/output), chat `messages`, or `text`."""
    if "messages" in record or "instruction" in record:
        messages = record.get("messages") or [
            {"role": "user", "content": "\n\n".join(filter(None, [record["instruction"], record.get("input")]))},
            {"role": "assistant", "content": record["output"]},
        ]
        if use_chat_template:
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            if not full.startswith(prompt):
                raise ValueError("the chat template renders the prompt differently inside the full conversation")
            return prompt, full[len(prompt):]
        if "messages" in record:
            raise ValueError("chat `messages` records need a tokenizer with a chat template")
        prompt = (ALPACA_INPUT_PROMPT if record.get("input") else ALPACA_PROMPT).format(**record)
        return prompt, record["output"] + tokenizer.eos_token
    if "text" in record:
        return "", record["text"] + tokenizer.eos_token
    raise ValueError(f"records need instruction/output, messages or text columns; got {sorted(record)}")


def encode_prompt(prompt: str, tokenizer, use_chat_template: bool) -> list[int]:
    """Token ids of a prompt; a chat template writes its own special tokens, a plain prompt gets the tokenizer's."""
    return tokenizer(prompt, add_special_tokens=not use_chat_template)["input_ids"]


def tokenize_records(records: Dataset, tokenizer, data_args: DataArguments) -> Dataset:
    """input_ids / attention_mask / labels per record, truncated; records with no label token left are dropped."""
    use_chat_template = chat_template_on(data_args, tokenizer)

    def tokenize(record):
        prompt, completion = prompt_and_completion(record, tokenizer, use_chat_template)
        prompt_ids = encode_prompt(prompt, tokenizer, use_chat_template)
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        input_ids = (prompt_ids + completion_ids)[: data_args.max_seq_length]
        labels = ([-100] * len(prompt_ids) if data_args.completion_only_loss else prompt_ids) + completion_ids
        labels = labels[: data_args.max_seq_length]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}

    tokenized = records.map(tokenize, remove_columns=records.column_names, desc="tokenizing")
    kept = tokenized.filter(lambda r: any(label != -100 for label in r["labels"][1:]))
    if len(kept) < len(tokenized):
        logger.warning(f"dropped {len(tokenized) - len(kept)} of {len(tokenized)} records: no response token fits "
                       f"in max_seq_length={data_args.max_seq_length}")
    if len(kept) == 0:
        raise ValueError(f"no record has a response token left after truncation to max_seq_length="
                         f"{data_args.max_seq_length}; raise --max_seq_length")
    return kept


def chat_template_on(data_args: DataArguments, tokenizer) -> bool:
    if data_args.use_chat_template is None:
        return tokenizer.chat_template is not None
    if data_args.use_chat_template and tokenizer.chat_template is None:
        raise ValueError("--use_chat_template was asked for, but the tokenizer has no chat template")
    return data_args.use_chat_template


@torch.no_grad()
def heldout_loss(model, tokenized: Dataset, tokenizer, batch_size: int = 8) -> dict:
    """Mean negative log-likelihood per label token (labels -100 skipped) and perplexity = exp(loss)."""
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in tqdm(range(0, len(tokenized), batch_size), desc="held-out loss"):
        batch = collator([tokenized[i] for i in range(start, min(start + batch_size, len(tokenized)))])
        batch = batch.to(model.device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum").item()
        count += int((labels != -100).sum())
    model.train(was_training)
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count}


# ------------------------------------------------------------------------------------------------ main

def load_model(model_name_or_path: str, adapter_path: str | None = None, trust_remote_code: bool = False):
    """The model, with a PEFT adapter merged in when `adapter_path` is given."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model(model_name_or_path), trust_remote_code=trust_remote_code)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def main():
    parser = HfArgumentParser((EvalArguments, DataArguments))
    args, data_args = parser.parse_args_into_dataclasses()
    names = benchmark_names(args.benchmarks)
    tokenizer = load_tokenizer(resolve_model(args.model_name_or_path), args.trust_remote_code)
    model = load_model(args.model_name_or_path, args.adapter_path, args.trust_remote_code)
    report = {"model_name_or_path": args.model_name_or_path, "adapter_path": args.adapter_path}
    if args.eval_heldout:
        records = load_records(data_args)
        if data_args.heldout_size:
            records = split_heldout(records, data_args.heldout_size, args.seed)[1]
        report["heldout"] = heldout_loss(model, tokenize_records(records, tokenizer, data_args), tokenizer,
                                         args.batch_size)
        report["data"] = asdict(data_args)
        print(f"held-out loss {report['heldout']['loss']:.4f}  perplexity {report['heldout']['perplexity']:.3f}  "
              f"({len(records)} records, {report['heldout']['tokens']} tokens)")
    if names:
        results = evaluate_benchmarks(model, tokenizer, names, args.limit or None, args.batch_size, args.log_samples)
        report.update(limit=args.limit, benchmarks=results["results"])
        if args.log_samples:
            report["samples"] = results["samples"]
    print(f"wrote {write_report(report, args.output_dir, 'eval_results.json')}")


if __name__ == "__main__":
    main()
