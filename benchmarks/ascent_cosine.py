"""How well each ascent direction points uphill: cos(ascent direction, true gradient) at every step of a real run.

    HF_HUB_OFFLINE=1 python benchmarks/ascent_cosine.py --models minilm smollm2-lora --steps 60

Each (model, method) fine-tunes for `--steps` optimizer steps with `sam_cosine_log_steps=1` and `logging_steps=1`, so
the trainer logs `ascent_cosine` (one extra backward per step, on the selected tensors) at every step that was
perturbed. MiniLM trains on MRPC (the GLUE benchmark's data), SmolLM2-135M + LoRA on blocks of the shipped Alpaca
texts (the step-cost benchmark's data). Writes <output_dir>/ascent_cosine.jsonl (one line per run: every step's
cosine, and every step's coverage: the share of the selected elements the direction spans, which is below 1 where a
direction needs state that a tensor does not have yet) and prints the median, quartiles and share of positive
cosines, and the mean coverage, per run.
"""

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser, set_seed

from slsam_hf import SAMTrainer, SAMTrainingArguments

from glue_accuracy import METHODS, glue_data  # noqa: I001 (benchmarks/ is the script's folder)
from step_cost import MODELS, check_names, load_model, packed_dataset

# Per model: data and the training settings of its benchmark (MiniLM: GLUE accuracy; SmolLM2: the LLM recipe).
SETTINGS = {"minilm": {"batch_size": 16, "learning_rate": 5e-5},
            "smollm2-lora": {"batch_size": 4, "learning_rate": 1e-3}}


@dataclass
class AscentCosineArguments:
    models: list[str] = field(default_factory=lambda: ["minilm", "smollm2-lora"],
                              metadata={"help": f"From {list(SETTINGS)}."})
    methods: list[str] = field(default_factory=lambda: ["sl_zo", "sl_zo_momentum"],
                               metadata={"help": f"From the GLUE benchmark's methods {list(METHODS)}."})
    steps: int = field(default=60, metadata={"help": "Optimizer steps per run (each logs one cosine)."})
    seq_length: int = field(default=128, metadata={"help": "Tokens per example."})
    seed: int = field(default=0, metadata={"help": "Training seed."})
    output_dir: str = field(default="benchmarks/results", metadata={"help": "Where ascent_cosine.jsonl goes."})

    def __post_init__(self):
        check_names("models", self.models, SETTINGS)
        check_names("methods", self.methods, METHODS)


class CoverageTrainer(SAMTrainer):
    """Records, at the first micro-batch of each step, the share of the selected elements the direction spans."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.coverage = []

    def _ascent_direction(self, model, inputs, num_items_in_batch):
        params, direction, loss = super()._ascent_direction(model, inputs, num_items_in_batch)
        if self._micro_step == 0:
            spanned = 0 if direction is None else sum(p.numel() for p in params)
            self.coverage.append(spanned / sum(p.numel() for p in self._params))
        return params, direction, loss


@dataclass
class _GlueLimits:
    """The subset of the GLUE benchmark's arguments that `glue_data` reads."""

    max_seq_length: int
    max_train_samples: int | None = None
    max_eval_samples: int | None = 64


def cosines(args: AscentCosineArguments, model_key: str, method: str) -> dict:
    """Train once; the logged ascent_cosine of every perturbed step and the number of unperturbed steps."""
    set_seed(args.seed)
    model, tokenizer = load_model(model_key)
    settings = SETTINGS[model_key]
    if MODELS[model_key]["task"] == "classification":
        train, _, _ = glue_data("mrpc", tokenizer, _GlueLimits(args.seq_length))
    else:
        train = packed_dataset(tokenizer, "causal", settings["batch_size"] * args.steps, args.seq_length, args.seed)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = SAMTrainingArguments(
            output_dir=output_dir, max_steps=args.steps, learning_rate=settings["learning_rate"],
            per_device_train_batch_size=settings["batch_size"], seed=args.seed, logging_steps=1,
            sam_cosine_log_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(), **METHODS[method],
        )
        trainer = CoverageTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer)
        trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return {"cosines": [log["ascent_cosine"] for log in logs if "ascent_cosine" in log],
            "skipped": int(sum(log.get("perturbation_skipped", 0) for log in logs)), "steps": len(logs),
            "coverage": trainer.coverage}


def summary(record: dict) -> str:
    c = np.asarray(record["cosines"])
    coverage = record.get("coverage")
    spans = "-" if not coverage else f"{np.mean(coverage[:10]):.0%} / {np.mean(coverage):.0%}"
    if not c.size:
        return f"| {record['model']} | {record['method']} | - | - | - | {record['skipped']} / {record['steps']} | {spans} |"
    q1, median, q3 = np.percentile(c, [25, 50, 75])
    return (f"| {record['model']} | {record['method']} | {median:.3g} | {q1:.3g} .. {q3:.3g} | {np.mean(c > 0):.0%} | "
            f"{record['skipped']} / {record['steps']} | {spans} |")


def main(argv: list[str] | None = None):
    (args,) = HfArgumentParser(AscentCosineArguments).parse_args_into_dataclasses(args=argv)
    path = Path(args.output_dir) / "ascent_cosine.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["| model | method | median cos | quartiles | positive | unperturbed steps | coverage (first 10 steps / all) |",
             "|---|---|---|---|---|---|---|"]
    for model_key in args.models:
        for method in args.methods:
            started = time.time()
            record = {"model": model_key, "method": method, "seed": args.seed, "seq_length": args.seq_length,
                      **cosines(args, model_key, method)}
            record["run_seconds"] = time.time() - started
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
            lines.append(summary(record))
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
