"""Fine-tune a causal LM on instruction data with SAMTrainer (SL-SAM layer selection + ZO-SAM), LoRA by default.

    accelerate launch recipes/finetune_llm.py         # SmolLM2-135M-Instruct + LoRA on data/instruct, a few minutes
    accelerate launch recipes/finetune_llm.py --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct \\
        --dataset_name tatsu-lab/alpaca --max_steps 1000 --eval_benchmarks arc_easy,piqa --eval_limit 200

Reports the training-loss curve, held-out loss / perplexity and a greedy sample before and after training, and the
SAM figures; writes finetune_report.json and the adapter (or full model) with its tokenizer and model card to
--output_dir.
"""

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from eval_llm import (
    DataArguments,
    benchmark_names,
    chat_template_on,
    encode_prompt,
    evaluate_benchmarks,
    heldout_loss,
    load_records,
    load_tokenizer,
    prompt_and_completion,
    split_heldout,
    tokenize_records,
    write_report,
)
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, HfArgumentParser, set_seed

from slsam_hf import SAMTrainer, SAMTrainingArguments
from slsam_hf.assets import SMOLLM2, hub_id, resolve_model

REPORT_JSON = "finetune_report.json"
# Recipe defaults for SAMTrainingArguments: a run that ends in a few minutes on a 2-core CPU.
TRAINING_DEFAULTS = dict(
    output_dir="outputs/finetune_llm", max_steps=20, per_device_train_batch_size=4, per_device_eval_batch_size=8,
    learning_rate=1e-3, logging_steps=5, save_strategy="no", report_to="none",
)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=SMOLLM2,
        metadata={"help": f"A causal LM: Hub name, local folder, or the offline alias '{SMOLLM2}' (a real "
                          "pretrained model that installs from PyPI)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    use_lora: bool = field(
        default=True, metadata={"help": "Train a LoRA adapter (PEFT); --no_use_lora fine-tunes every weight."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names LoRA adapts, e.g. q_proj v_proj; 'all-linear': every linear layer but the "
                          "output head.", "nargs": "+"},
    )


@dataclass
class ReportArguments:
    sample_max_new_tokens: int = field(
        default=32, metadata={"help": "Tokens of the greedy sample generated before and after training."}
    )
    eval_benchmarks: str | None = field(
        default=None,
        metadata={"help": "After training, run these benchmarks of eval_llm.py (comma-separated, e.g. arc_easy,piqa)."},
    )
    eval_limit: int = field(default=200, metadata={"help": "Items per benchmark (the first N); 0: all."})


def build_model(model_args: ModelArguments):
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(model_args.model_name_or_path), trust_remote_code=model_args.trust_remote_code
    )
    if not model_args.use_lora:
        return model
    targets = model_args.lora_target_modules
    config = LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Greedy continuation of `prompt_ids`, decoded without special tokens."""
    was_training = model.training
    model.eval()
    input_ids = torch.tensor([prompt_ids], device=model.device)
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True)


def evaluate_model(model, tokenizer, heldout, prompt_ids, training_args, report_args) -> dict:
    return {
        **heldout_loss(model, heldout, tokenizer, training_args.per_device_eval_batch_size),
        "sample": generate(model, tokenizer, prompt_ids, report_args.sample_max_new_tokens),
    }


def mean_logged(log_history: list[dict], key: str) -> float | None:
    values = [entry[key] for entry in log_history if key in entry]
    return float(np.mean(values)) if values else None


def training_report(trainer, before: dict, after: dict) -> dict:
    """Loss curve, held-out figures before and after, and the SAM figures averaged over the logged windows."""
    history = trainer.state.log_history
    losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    args = trainer.args
    return {
        "steps": trainer.state.global_step,
        "train_runtime_s": next((e["train_runtime"] for e in history if "train_runtime" in e), None),
        "train_loss": {
            "first": losses[0][1] if losses else None,
            "last": losses[-1][1] if losses else None,
            "min": min(loss for _, loss in losses) if losses else None,
            "logged": losses,
        },
        "heldout_before": before,
        "heldout_after": after,
        "sam": {
            "sam_mode": args.sam_mode,
            "layer_selection": args.layer_selection,
            "arms": len(trainer.arms),
            "mean_sharpness": mean_logged(history, "sharpness"),
            "mean_loss_perturbed": mean_logged(history, "loss_perturbed"),
            "active_param_ratio": mean_logged(history, "active_param_ratio"),
            "selected_arms": mean_logged(history, "selected_arms"),
        },
    }


def print_report(report: dict):
    loss, before, after, sam = report["train_loss"], report["heldout_before"], report["heldout_after"], report["sam"]

    def number(value):
        return "n/a" if value is None else f"{value:.4g}"

    print(f"\n==== finetune_llm report: {report['model_name_or_path']}, {report['steps']} steps ====")
    print(f"train loss   first {number(loss['first'])}  last {number(loss['last'])}  min {number(loss['min'])} "
          f"({len(loss['logged'])} logged)")
    print(f"held-out     loss {before['loss']:.4f} -> {after['loss']:.4f}   "
          f"perplexity {before['perplexity']:.3f} -> {after['perplexity']:.3f}   ({after['tokens']} tokens)")
    print(f"SAM          {sam['sam_mode']} / {sam['layer_selection']}: {sam['arms']} arms, selected per step "
          f"{number(sam['selected_arms'])}, active_param_ratio {number(sam['active_param_ratio'])}, "
          f"mean sharpness {number(sam['mean_sharpness'])}, mean perturbed loss {number(sam['mean_loss_perturbed'])}")
    print(f"sample prompt  {report['prompt']!r}\n  before: {before['sample']!r}\n  after:  {after['sample']!r}")


def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, ReportArguments, SAMTrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    model_args, data_args, report_args, training_args = parser.parse_args_into_dataclasses()
    benchmarks = benchmark_names(report_args.eval_benchmarks or "")
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(resolve_model(model_args.model_name_or_path), model_args.trust_remote_code)
    model = build_model(model_args)
    with training_args.main_process_first(desc="tokenizing"):
        train_records, heldout_records = split_heldout(load_records(data_args), data_args.heldout_size,
                                                       training_args.seed)
        train_set = tokenize_records(train_records, tokenizer, data_args)
        heldout_set = tokenize_records(heldout_records, tokenizer, data_args)
    use_chat_template = chat_template_on(data_args, tokenizer)
    prompt = prompt_and_completion(heldout_records[0], tokenizer, use_chat_template)[0]
    prompt_ids = encode_prompt(prompt, tokenizer, use_chat_template)

    trainer = SAMTrainer(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=heldout_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), processing_class=tokenizer,
    )
    main_process = trainer.is_world_process_zero()
    if main_process:
        before = evaluate_model(model, tokenizer, heldout_set, prompt_ids, training_args, report_args)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(finetuned_from=hub_id(model_args.model_name_or_path),
                              dataset=data_args.dataset_name or os.path.basename(data_args.data_file))
    if not main_process:
        return
    after = evaluate_model(model, tokenizer, heldout_set, prompt_ids, training_args, report_args)
    report = {"model_name_or_path": model_args.model_name_or_path, "use_lora": model_args.use_lora,
              "train_records": len(train_set), "heldout_records": len(heldout_set), "prompt": prompt,
              **training_report(trainer, before, after)}
    print_report(report)
    if benchmarks:
        results = evaluate_benchmarks(model, tokenizer, benchmarks, report_args.eval_limit or None,
                                      training_args.per_device_eval_batch_size)
        report["benchmarks"] = results["results"]
    path = write_report(report, training_args.output_dir, REPORT_JSON)
    print(f"wrote {path}; model saved to {training_args.output_dir}")


if __name__ == "__main__":
    main()
