"""GLUE dev metrics of each SAM variant fine-tuning the real MiniLM, at equal steps and at equal training time.

    HF_HUB_OFFLINE=1 python benchmarks/glue_accuracy.py --tasks mrpc rte --seeds 0 --max_train_samples 1000

Data loading and the official metrics come from recipes/run_glue.py. Per (task, seed) AdamW runs first; its
training time (the sum of its optimizer-step times, evaluation excluded) is every other method's budget. Each run
trains the full schedule (budget 'steps': same epochs, learning rate and batches for all) and is also evaluated at
the step where its own training time passes AdamW's (budget 'time'); a method that is done within the budget
reports its final model for both. Every result is a line of <output_dir>/glue_accuracy.jsonl, keyed by (task,
method, seed, budget, setting); keys already there are skipped, so the grid can run in parts and resume.
"""

import json
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from transformers import HfArgumentParser, TrainerCallback, set_seed

from slsam_hf import SAMTrainer, SAMTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import run_glue
from step_cost import METHODS as COST_METHODS
from step_cost import check_names, load_model, mean_percent, mean_std, read_jsonl, setting_key

# The step-cost methods, the default mode with the paper's rule (the task head is a bandit arm too), and the default
# mode at a 50 % budget (the candidate default if 20 % costs accuracy).
METHODS = {
    **COST_METHODS,
    "sl_zo_paper": {**COST_METHODS["sl_zo"], "always_selected": ["none"]},
    "sl_zo_half_budget": {**COST_METHODS["sl_zo"], "selection_budget": 0.5},
    # Sparse-update rules, without perturbation (isolates how a sparse step moves the weights).
    "sparse_freeze": {"sam_mode": "none", "layer_selection": "bandit", "sparse_update": "freeze"},
    "sparse_scale": {"sam_mode": "none", "layer_selection": "bandit", "sparse_update": "scale"},
    "sparse_momentum": {"sam_mode": "none", "layer_selection": "bandit", "sparse_update": "momentum"},
    "sparse_hold": {"sam_mode": "none", "layer_selection": "bandit", "sparse_update": "freeze",
                    "selection_interval": 20},
    "sparse_per_parameter": {"sam_mode": "none", "layer_selection": "bandit", "sparse_update": "freeze",
                             "bandit_reward": "per_parameter"},
    "sparse_scale_hold": {"sam_mode": "none", "layer_selection": "bandit", "sparse_update": "scale",
                          "selection_interval": 20},
    "sparse_scale_per_parameter": {"sam_mode": "none", "layer_selection": "bandit", "sparse_update": "scale",
                                   "bandit_reward": "per_parameter"},
    # Momentum-guided probe and MSAM, with the sparse rule that kept accuracy (scale).
    "sl_zo_momentum_probe025_rho002": {**COST_METHODS["sl_zo_momentum_probe025"], "sam_rho": 0.02},
    "sl_zo_momentum_probe025_rho015": {**COST_METHODS["sl_zo_momentum_probe025"], "sam_rho": 0.15},
    "zo_momentum_all": {"sam_mode": "zo", "zo_direction": "momentum", "layer_selection": "all",
                        "zo_probe_fraction": 1.0},
    "msam_all": {"sam_mode": "msam", "layer_selection": "all", "sam_rho": 0.5},
}


@dataclass
class GlueAccuracyArguments:
    tasks: list[str] = field(default_factory=lambda: ["sst2", "mrpc", "rte"], metadata={"help": "GLUE tasks."})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"From {list(METHODS)}."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs, the same for every method."})
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate, the same for every method."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example (longer ones are truncated)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first n training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first n dev examples."})
    selection_budget: float = field(
        default=0.2, metadata={"help": "selection_budget of the selection methods that do not set their own."}
    )
    budget_clock: str = field(
        default="cpu",
        metadata={"help": "Clock of the time budget. 'cpu': process CPU time of the optimizer steps (robust on a "
                          "machine shared with other jobs); 'wall': their wall-clock time (use it on a GPU).",
                  "choices": ["cpu", "wall"]},
    )
    output_dir: str = field(default="benchmarks/results", metadata={"help": "Where glue_accuracy.jsonl goes."})

    def __post_init__(self):
        check_names("tasks", self.tasks, run_glue.TASKS)
        check_names("methods", self.methods, METHODS)
        if self.budget_clock not in ("cpu", "wall"):
            raise ValueError(f"budget_clock must be 'cpu' or 'wall', got {self.budget_clock!r}")

    @property
    def setting(self) -> str:
        """What makes two results comparable besides (task, method, seed, budget)."""
        return setting_key(self, ("num_train_epochs", "learning_rate", "per_device_train_batch_size", "max_seq_length",
                                  "max_train_samples", "max_eval_samples", "selection_budget", "budget_clock"))


class TrainingClock(TrainerCallback):
    """Sums the wall and CPU time of optimizer steps; once the `clock` sum passes `budget` seconds, asks for an
    evaluation at that step and keeps its step, times and metrics."""

    def __init__(self, clock: str, budget: float | None):
        self.clock, self.budget = clock, budget
        self.seconds = {"wall": 0.0, "cpu": 0.0}
        self.budget_step = self.budget_seconds = self.budget_metrics = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = {"wall": time.perf_counter(), "cpu": time.process_time()}

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds["wall"] += time.perf_counter() - self._begin["wall"]
        self.seconds["cpu"] += time.process_time() - self._begin["cpu"]
        if self.budget is not None and self.budget_step is None and self.seconds[self.clock] >= self.budget:
            self.budget_step, self.budget_seconds = state.global_step, dict(self.seconds)
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step == self.budget_step and self.budget_metrics is None:
            self.budget_metrics = dict(metrics)


def glue_data(task: str, tokenizer, args: GlueAccuracyArguments):
    """(train, dev, compute_metrics) for a shipped GLUE task, through recipes/run_glue.py."""
    raw = run_glue.load_raw_datasets(run_glue.DataTrainingArguments(task_name=task), cache_dir=None)
    raw = run_glue.encode_labels(raw, run_glue.label_names(raw, task))
    fields = run_glue.text_columns(raw, task)
    train, dev = (run_glue.tokenize(raw[split], tokenizer, fields, args.max_seq_length, limit)
                  for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)))
    return train, dev, run_glue.metric_function(run_glue.load_metric(task, is_regression=False), is_regression=False)


def train_one(args: GlueAccuracyArguments, task: str, method: str, seed: int, budget: float | None) -> tuple:
    """Fine-tune MiniLM once; returns (metrics at the end, metrics at the time budget or None, clock, trainer)."""
    set_seed(seed)
    model, tokenizer = load_model("minilm")
    train, dev, compute_metrics = glue_data(task, tokenizer, args)
    clock = TrainingClock(args.budget_clock, budget)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = SAMTrainingArguments(
            output_dir=output_dir, num_train_epochs=args.num_train_epochs, learning_rate=args.learning_rate,
            per_device_train_batch_size=args.per_device_train_batch_size, per_device_eval_batch_size=64, seed=seed,
            logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            **{"selection_budget": args.selection_budget, **METHODS[method]},
        )
        trainer = SAMTrainer(
            model=model, args=training_args, train_dataset=train, eval_dataset=dev, processing_class=tokenizer,
            compute_metrics=compute_metrics,
            callbacks=[clock],
        )
        trainer.train()
        final = trainer.evaluate()
    return final, clock.budget_metrics, clock, trainer


def official(metrics: dict) -> dict:
    """The GLUE dev metrics (accuracy; accuracy and F1 for MRPC) out of Trainer's eval_* dict."""
    return {k.removeprefix("eval_"): v for k, v in metrics.items() if k in ("eval_accuracy", "eval_f1")}


def find(results: list[dict], *key) -> dict | None:
    """The result line with (task, method, seed, budget, setting) == key, if any."""
    return next((r for r in results if (r["task"], r["method"], r["seed"], r["budget"], r["setting"]) == key), None)


def run_grid(args: GlueAccuracyArguments, path: Path) -> None:
    """Run every missing (task, method, seed), AdamW first, appending its two result lines to `path`."""
    for task in args.tasks:
        for seed in args.seeds:
            for method in ["adamw"] + [m for m in args.methods if m != "adamw"]:
                results = read_jsonl(path)
                if find(results, task, method, seed, "steps", args.setting):
                    continue
                adamw = find(results, task, "adamw", seed, "steps", args.setting)
                budget = adamw[f"train_{args.budget_clock}_seconds"] if adamw else None
                started = time.time()
                final, at_budget, clock, trainer = train_one(args, task, method, seed, budget)
                ratios = [log["active_param_ratio"] for log in trainer.state.log_history if "active_param_ratio" in log]
                steps = trainer.state.global_step
                common = {
                    "task": task, "method": method, "seed": seed, "setting": args.setting, "total_steps": steps,
                    "active_param_ratio": float(np.mean(ratios)) if ratios else None,
                    "run_seconds": time.time() - started,
                }
                at_end = {"steps": steps, "train_wall_seconds": clock.seconds["wall"],
                          "train_cpu_seconds": clock.seconds["cpu"], "metrics": official(final)}
                if at_budget is None:  # AdamW, or done within AdamW's time
                    at_time = dict(at_end, within_budget=True)
                else:
                    at_time = {"steps": clock.budget_step, "train_wall_seconds": clock.budget_seconds["wall"],
                               "train_cpu_seconds": clock.budget_seconds["cpu"], "metrics": official(at_budget),
                               "within_budget": False}
                with open(path, "a") as f:
                    f.write(json.dumps(dict(common, budget="steps", **at_end)) + "\n")
                    f.write(json.dumps(dict(common, budget="time", budget_seconds=budget, **at_time)) + "\n")
                print(f"{task} seed {seed} {method}: {official(final)}, {steps} steps, {clock.seconds['wall']:.0f} s "
                      f"wall / {clock.seconds['cpu']:.0f} s CPU; at AdamW's time: {at_time['metrics']}", flush=True)


def summarize(results: list[dict], setting: str, tasks: list[str], methods: list[str]) -> str:
    """Markdown table: mean +- std over seeds of each metric, training time and steps per (task, budget, method)."""
    groups = defaultdict(list)
    for r in results:
        if r["setting"] == setting and r["task"] in tasks and r["method"] in methods:
            groups[(r["task"], r["budget"], r["method"])].append(r)
    lines = ["| task | budget | method | seeds | accuracy | F1 | train s (wall) | train s (CPU) | steps | active |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for budget in ("steps", "time"):
            for method in methods:
                runs = groups.get((task, budget, method))
                if not runs:
                    continue
                cells = [mean_std([100 * r["metrics"][key] for r in runs if key in r["metrics"]])
                         for key in ("accuracy", "f1")]
                lines.append(
                    f"| {task} | {budget} | {method} | {len(runs)} | {cells[0]} | {cells[1]} | "
                    f"{np.mean([r['train_wall_seconds'] for r in runs]):.0f} | "
                    f"{np.mean([r['train_cpu_seconds'] for r in runs]):.0f} | "
                    f"{np.mean([r['steps'] for r in runs]):.0f} | "
                    f"{mean_percent([r['active_param_ratio'] for r in runs if r['active_param_ratio'] is not None])} |"
                )
    return "\n".join(lines)


def paired_differences(results: list[dict], setting: str, tasks: list[str], methods: list[str]) -> str:
    """Markdown table: per (task, budget, method), the accuracy difference to AdamW of the same seed, d_s, with its
    mean and 95 % paired-t interval mean(d) +- t_{0.975, n-1} * std(d, ddof=1) / sqrt(n) (n >= 2 seeds)."""
    accuracy = {(r["task"], r["budget"], r["method"], r["seed"]): 100 * r["metrics"]["accuracy"]
                for r in results if r["setting"] == setting}
    lines = ["| task | budget | method | paired seeds | difference to AdamW (points) | 95 % interval | per seed |",
             "|---|---|---|---|---|---|---|"]
    for task in tasks:
        for budget in ("steps", "time"):
            for method in methods:
                if method == "adamw":
                    continue
                seeds = sorted(s for t, b, m, s in accuracy if (t, b, m) == (task, budget, method)
                               and (task, budget, "adamw", s) in accuracy)
                d = np.array([accuracy[task, budget, method, s] - accuracy[task, budget, "adamw", s] for s in seeds])
                if d.size == 0:
                    continue
                half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else None
                interval = "-" if half is None else f"{d.mean() - half:+.1f} .. {d.mean() + half:+.1f}"
                lines.append(f"| {task} | {budget} | {method} | {d.size} | {d.mean():+.1f} | {interval} | "
                             f"{', '.join(f'{x:+.1f}' for x in d)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    """Parse `argv` (default: the command line), run, print this run's table and write every setting's table."""
    (args,) = HfArgumentParser(GlueAccuracyArguments).parse_args_into_dataclasses(args=argv)
    path = Path(args.output_dir) / "glue_accuracy.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    run_grid(args, path)
    results = read_jsonl(path)
    print(f"setting: {args.setting}\n{summarize(results, args.setting, args.tasks, args.methods)}\n\n"
          f"{paired_differences(results, args.setting, args.tasks, args.methods)}")
    settings = dict.fromkeys(r["setting"] for r in results)
    sections = [f"setting: `{setting}`\n\n{summarize(results, setting, list(run_glue.TASKS), list(METHODS))}\n\n"
                f"{paired_differences(results, setting, list(run_glue.TASKS), list(METHODS))}\n"
                for setting in settings]
    (path.parent / "glue_accuracy.md").write_text("\n".join(sections))


if __name__ == "__main__":
    main()
