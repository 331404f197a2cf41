"""How well each ascent direction points uphill: cos(ascent direction, true gradient) at every step of a real run.

    HF_HUB_OFFLINE=1 python benchmarks/ascent_cosine.py --models minilm smollm2-lora --steps 60
    HF_HUB_OFFLINE=1 python benchmarks/ascent_cosine.py --priors --models minilm smollm2-lora --steps 60

Each (model, method) fine-tunes for `--steps` optimizer steps with `sam_cosine_log_steps=1` and `logging_steps=1`, so
the trainer logs `ascent_cosine` (one extra backward per step, on the selected tensors) at every step that was
perturbed. MiniLM trains on MRPC (the GLUE benchmark's data), SmolLM2-135M + LoRA on blocks of the shipped Alpaca
texts (the step-cost benchmark's data). Writes <output_dir>/ascent_cosine.jsonl (one line per run: every step's
cosine, and every step's coverage: the share of the selected elements the direction spans, which is below 1 where a
direction needs state that a tensor does not have yet) and prints the median, quartiles and share of positive
cosines, and the mean coverage, per run.

With `--priors`, each model instead trains with plain AdamW and, at every step, measures how well each direction a
probe could take without a backward pass points along that step's minibatch gradient g_t (over all trainable
tensors): AdamW's first moment m_{t-1}, its update direction m_{t-1} / (sqrt(v_{t-1}) + eps), and the previous
gradient g_{t-1}. These cosines bound what a probe along each prior can reach (the probe only picks the sign).
"""

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser, TrainerCallback, set_seed

from slsam_hf import SAMTrainer, SAMTrainingArguments
from slsam_hf.ascent import cosine_similarity

from glue_accuracy import METHODS, GlueAccuracyArguments, glue_data  # noqa: I001 (benchmarks/ is the script's folder)
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
    priors: bool = field(default=False, metadata={"help": "Measure the candidate prior directions during AdamW "
                                                          "training instead of the methods' logged cosines."})
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


class PriorCosines(TrainerCallback):
    """Before each optimizer step: cos(g_t, prior) of each candidate prior over all trainable tensors."""

    def __init__(self):
        self.cosines = {"first_moment": [], "adam_update": [], "previous_gradient": []}
        self.previous = None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad.detach().float() for p in params]
        states = [optimizer.state.get(p, {}) for p in params]
        if all("exp_avg" in s for s in states):
            eps = optimizer.param_groups[0]["eps"]
            self.cosines["first_moment"].append(cosine_similarity([s["exp_avg"] for s in states], grads))
            self.cosines["adam_update"].append(cosine_similarity(
                [s["exp_avg"] / (s["exp_avg_sq"].sqrt() + eps) for s in states], grads))
        if self.previous is not None:
            self.cosines["previous_gradient"].append(cosine_similarity(self.previous, grads))
        self.previous = [g.clone() for g in grads]


def train(args: AscentCosineArguments, model_key: str, method: str, callbacks=()) -> CoverageTrainer:
    """Fine-tune `model_key` with `method` for `args.steps` steps, logging ascent_cosine at every step."""
    set_seed(args.seed)
    model, tokenizer = load_model(model_key)
    settings = SETTINGS[model_key]
    if MODELS[model_key]["task"] == "classification":
        limits = GlueAccuracyArguments(tasks=["mrpc"], max_seq_length=args.seq_length, max_eval_samples=64)
        train, _, _ = glue_data("mrpc", tokenizer, limits)
    else:
        train = packed_dataset(tokenizer, "causal", settings["batch_size"] * args.steps, args.seq_length, args.seed)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = SAMTrainingArguments(
            output_dir=output_dir, max_steps=args.steps, learning_rate=settings["learning_rate"],
            per_device_train_batch_size=settings["batch_size"], seed=args.seed, logging_steps=1,
            sam_cosine_log_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(), **METHODS[method],
        )
        trainer = CoverageTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                                  callbacks=list(callbacks))
        trainer.train()
    return trainer


def cosines(args: AscentCosineArguments, model_key: str, method: str) -> dict:
    """Train once; the logged ascent_cosine of every perturbed step and the number of unperturbed steps."""
    trainer = train(args, model_key, method)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return {"cosines": [log["ascent_cosine"] for log in logs if "ascent_cosine" in log],
            "skipped": int(sum(log.get("perturbation_skipped", 0) for log in logs)), "steps": len(logs),
            "coverage": trainer.coverage}


def prior_cosines(args: AscentCosineArguments, model_key: str) -> dict:
    """Train with AdamW; every step's cos(g_t, prior) of each candidate prior."""
    measure = PriorCosines()
    trainer = train(args, model_key, "adamw", [measure])
    return {"priors": measure.cosines, "steps": trainer.state.global_step}


def quartiles(values) -> str:
    """'median | q1 .. q3 | share positive' table cells."""
    c = np.asarray(values)
    q1, median, q3 = np.percentile(c, [25, 50, 75])
    return f"{median:.3g} | {q1:.3g} .. {q3:.3g} | {np.mean(c > 0):.0%}"


def summary(record: dict) -> str:
    coverage = record.get("coverage")
    spans = "-" if not coverage else f"{np.mean(coverage[:10]):.0%} / {np.mean(coverage):.0%}"
    cells = quartiles(record["cosines"]) if record["cosines"] else "- | - | -"
    return f"| {record['model']} | {record['method']} | {cells} | {record['skipped']} / {record['steps']} | {spans} |"


def main(argv: list[str] | None = None):
    (args,) = HfArgumentParser(AscentCosineArguments).parse_args_into_dataclasses(args=argv)
    path = Path(args.output_dir) / "ascent_cosine.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.priors:
        lines = ["| model | prior | median abs cos (a probe's reach) | median cos with g_t | quartiles | positive |",
                 "|---|---|---|---|---|---|"]
    else:
        lines = ["| model | method | median cos | quartiles | positive | unperturbed steps | coverage (first 10/all) |",
                 "|---|---|---|---|---|---|---|"]
    for model_key in args.models:
        for method in ["priors"] if args.priors else args.methods:
            started = time.time()
            measured = prior_cosines(args, model_key) if args.priors else cosines(args, model_key, method)
            record = {"model": model_key, "method": method, "seed": args.seed, "seq_length": args.seq_length,
                      **measured, "run_seconds": time.time() - started}
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if args.priors:
                lines += [f"| {model_key} | {name} | {np.median(np.abs(c)):.3g} | {quartiles(c)} |"
                          for name, c in record["priors"].items()]
            else:
                lines.append(summary(record))
            print("\n".join(lines[2:]), flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
