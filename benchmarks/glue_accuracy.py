"""GLUE dev metrics and flatness of each SAM variant fine-tuning the real MiniLM, at equal steps and at equal
training time.

    HF_HUB_OFFLINE=1 python benchmarks/glue_accuracy.py --tasks mrpc rte --seeds 0 1 2 --max_train_samples 1000

Data loading and the official metrics come from recipes/run_glue.py; `--label_noise 0.2` flips a fifth of the
training labels (fixed seed; the dev set stays clean). Budget 'steps': every method trains the same schedule (same
epochs, learning rate and batches). Budget 'equal_time', done as a user would: a method whose step costs r times
AdamW's trains round(steps_AdamW / r) steps with its learning-rate schedule set for that many steps; r is the median
over seeds of the method's training time / AdamW's in this grid's 'steps' runs (the `budget_clock`, CPU by default).
Every run also measures the flatness of its final model on the first `sharpness_samples` dev examples
(slsam_hf.sharpness). Every result is a line of <output_dir>/glue_accuracy.jsonl, keyed by (task, method, seed,
budget, setting); keys already there are skipped (the newest line of a key counts), so the grid runs in parts and
resumes. Tables go to glue_accuracy.md, one plot per task (accuracy against training time) to glue_accuracy_*.png.
"""

import json
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from transformers import DataCollatorWithPadding, HfArgumentParser, TrainerCallback, set_seed

from slsam_hf import SAMTrainer, SAMTrainingArguments
from slsam_hf.sharpness import measure_sharpness

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import run_glue
from step_cost import METHODS as COST_METHODS
from step_cost import check_names, load_model, mean_percent, mean_std, paired_interval, read_jsonl, setting_key

# The step-cost methods, the first build's default (sl_zo) with the paper's rule (the task head is a bandit arm too)
# and at a 50 % budget (the candidate default if 20 % costs accuracy).
METHODS = {
    **COST_METHODS,
    "sl_zo_paper": {**COST_METHODS["sl_zo"], "always_selected": ["none"]},
    "sl_zo_half_budget": {**COST_METHODS["sl_zo"], "selection_budget": 0.5},
    # Sparse-update rules, without perturbation (isolates how a sparse step moves the weights).
    "sparse_freeze": {"sam_mode": "none", "layer_selection": "bandit", "sparse_update": "freeze"},
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
    # Which part of the default loses SAM's flattening: the selection (gradient ascent on the selected tensors)?
    "sl_sam_scale": {"sam_mode": "sam", "layer_selection": "bandit", "sparse_update": "scale"},
    # SAM's ascent gradient from a quarter of each batch (m-sharpness): a quarter of a forward and backward extra.
    "sam_quarter": {**COST_METHODS["sam"], "sam_ascent_fraction": 0.25},
    "sl_sam_quarter": {"sam_mode": "sam", "layer_selection": "bandit", "sparse_update": "scale",
                       "sam_ascent_fraction": 0.25},
    # Lookback (the stored update gradient as the ascent, no extra pass) with the sparse rule that kept accuracy.
    "sl_lookback_scale": {"sam_mode": "lookback", "layer_selection": "bandit", "sparse_update": "scale"},
    # The radius grid of full SAM (rho 0.05 is "sam").
    "sam_rho002": {**COST_METHODS["sam"], "sam_rho": 0.02},
    "sam_rho01": {**COST_METHODS["sam"], "sam_rho": 0.1},
    "sam_rho02": {**COST_METHODS["sam"], "sam_rho": 0.2},
}


BUDGETS = ("steps", "equal_time")
SHARPNESS_KEYS = ("loss", "ascent_sharpness", "random_sharpness", "hessian_top_eigenvalue")


@dataclass
class GlueAccuracyArguments:
    tasks: list[str] = field(default_factory=lambda: ["sst2", "mrpc", "rte"], metadata={"help": "GLUE tasks."})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"From {list(METHODS)}."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds."})
    budgets: list[str] = field(
        default_factory=lambda: list(BUDGETS),
        metadata={"help": "'steps': the same schedule for every method; 'equal_time': AdamW's training time, the "
                          "schedule shortened by the method's measured step-time ratio (needs its 'steps' runs)."},
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs, the same for every method."})
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate, the same for every method."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example (longer ones are truncated)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first n training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first n dev examples."})
    label_noise: float = field(
        default=0.0, metadata={"help": "Share of training labels changed to another class (the dev set stays clean)."}
    )
    label_noise_seed: int = field(default=0, metadata={"help": "Seed choosing the noisy rows and their labels."})
    selection_budget: float = field(
        default=0.2, metadata={"help": "selection_budget of the selection methods that do not set their own."}
    )
    budget_clock: str = field(
        default="cpu",
        metadata={"help": "Clock of the equal-time ratio. 'cpu': process CPU time of the optimizer steps (robust on a "
                          "machine shared with other jobs); 'wall': their wall-clock time (use it on a GPU).",
                  "choices": ["cpu", "wall"]},
    )
    sharpness_samples: int = field(
        default=64, metadata={"help": "Flatness of each final model on the first n dev examples (0: not measured)."}
    )
    sharpness_batch_size: int = field(default=32, metadata={"help": "Batch size of the flatness measurement."})
    sharpness_rho: float = field(default=0.05, metadata={"help": "Radius of the ascent and random sharpness."})
    sharpness_directions: int = field(default=8, metadata={"help": "Gaussian directions of the random sharpness."})
    sharpness_hessian_iters: int = field(default=10, metadata={"help": "Power iterations for the top eigenvalue."})
    output_dir: str = field(default="benchmarks/results", metadata={"help": "Where glue_accuracy.jsonl goes."})

    def __post_init__(self):
        check_names("tasks", self.tasks, run_glue.TASKS)
        check_names("methods", self.methods, METHODS)
        check_names("budgets", self.budgets, BUDGETS)
        if self.budget_clock not in ("cpu", "wall"):
            raise ValueError(f"budget_clock must be 'cpu' or 'wall', got {self.budget_clock!r}")
        if not 0 <= self.label_noise <= 1:
            raise ValueError(f"label_noise must be in [0, 1], got {self.label_noise}")

    @property
    def setting(self) -> str:
        """What makes two results comparable besides (task, method, seed, budget)."""
        names = ("num_train_epochs", "learning_rate", "per_device_train_batch_size", "max_seq_length",
                 "max_train_samples", "max_eval_samples", "selection_budget", "budget_clock")
        return setting_key(self, names + (("label_noise", "label_noise_seed") if self.label_noise else ()))


class TrainingClock(TrainerCallback):
    """Sums the wall and CPU time of the optimizer steps (on_step_begin -> on_step_end)."""

    def __init__(self):
        self.seconds = {"wall": 0.0, "cpu": 0.0}

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = {"wall": time.perf_counter(), "cpu": time.process_time()}

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds["wall"] += time.perf_counter() - self._begin["wall"]
        self.seconds["cpu"] += time.process_time() - self._begin["cpu"]


def glue_data(task: str, tokenizer, args: GlueAccuracyArguments):
    """(train, dev, compute_metrics) for a shipped GLUE task, through recipes/run_glue.py; the training labels
    noisy when args.label_noise > 0."""
    raw = run_glue.load_raw_datasets(run_glue.DataTrainingArguments(task_name=task), cache_dir=None)
    names = run_glue.label_names(raw, task)
    raw = run_glue.encode_labels(raw, names)
    fields = run_glue.text_columns(raw, task)
    train, dev = (run_glue.tokenize(raw[split], tokenizer, fields, args.max_seq_length, limit)
                  for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)))
    if args.label_noise:
        train = run_glue.flip_labels(train, args.label_noise, len(names), args.label_noise_seed)
    return train, dev, run_glue.metric_function(run_glue.load_metric(task, is_regression=False), is_regression=False)


def sharpness_of(model, dev, tokenizer, args: GlueAccuracyArguments) -> dict:
    """slsam_hf.sharpness.measure_sharpness on the first args.sharpness_samples dev examples, with its CPU seconds
    and options."""
    rows = dev.select(range(min(args.sharpness_samples, len(dev))))
    collate = DataCollatorWithPadding(tokenizer)
    size = args.sharpness_batch_size
    batches = [collate([rows[i] for i in range(start, min(start + size, len(rows)))])
               for start in range(0, len(rows), size)]
    options = {"rho": args.sharpness_rho, "num_directions": args.sharpness_directions,
               "hessian_iters": args.sharpness_hessian_iters, "seed": 0}
    started = time.process_time()
    figures = measure_sharpness(model, batches, **options)
    return dict(figures, cpu_seconds=time.process_time() - started, samples=len(rows), **options)


def train_one(args: GlueAccuracyArguments, task: str, method: str, seed: int, max_steps: int = -1) -> dict:
    """Fine-tune MiniLM once (for max_steps steps if > 0, else args.num_train_epochs) and evaluate it; returns the
    fields of its result line."""
    set_seed(seed)
    model, tokenizer = load_model("minilm")
    train, dev, compute_metrics = glue_data(task, tokenizer, args)
    clock = TrainingClock()
    started = time.time()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = SAMTrainingArguments(
            output_dir=output_dir, num_train_epochs=args.num_train_epochs, max_steps=max_steps,
            learning_rate=args.learning_rate, per_device_train_batch_size=args.per_device_train_batch_size,
            per_device_eval_batch_size=64, seed=seed, logging_steps=10, save_strategy="no", report_to="none",
            disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
            **{"selection_budget": args.selection_budget, **METHODS[method]},
        )
        trainer = SAMTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=dev,
                             processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=[clock])
        trainer.train()
        metrics = official(trainer.evaluate())
    ratios = [log["active_param_ratio"] for log in trainer.state.log_history if "active_param_ratio" in log]
    record = {"steps": trainer.state.global_step,
              "train_wall_seconds": clock.seconds["wall"], "train_cpu_seconds": clock.seconds["cpu"],
              "metrics": metrics, "active_param_ratio": float(np.mean(ratios)) if ratios else None}
    if args.sharpness_samples:
        record["sharpness"] = sharpness_of(trainer.model, dev, tokenizer, args)
    record["run_seconds"] = time.time() - started
    return record


def official(metrics: dict) -> dict:
    """The GLUE dev metrics (accuracy; accuracy and F1 for MRPC) out of Trainer's eval_* dict."""
    return {k.removeprefix("eval_"): v for k, v in metrics.items() if k in ("eval_accuracy", "eval_f1")}


def latest(results: list[dict]) -> dict:
    """(task, method, seed, budget, setting) -> the newest result line of that key (a rerun replaces a line)."""
    return {(r["task"], r["method"], r["seed"], r["budget"], r["setting"]): r for r in results}


def budget_lines(results: list[dict], setting: str, budget: str) -> list[dict]:
    """The newest lines of `setting` at `budget`; AdamW's 'steps' runs stand for its 'equal_time' (its own time)."""
    lines = [r for r in latest(results).values() if r["setting"] == setting]
    return [r for r in lines if r["budget"] == budget or (budget == "equal_time" and r["method"] == "adamw"
                                                            and r["budget"] == "steps")]


def time_ratio(results: list[dict], setting: str, task: str, method: str, clock: str) -> tuple:
    """(median over seeds of the method's 'steps' training time / AdamW's of the same seed, seeds), or (None, [])."""
    runs = {(r["method"], r["seed"]): r for r in budget_lines(results, setting, "steps") if r["task"] == task}
    seeds = sorted(s for m, s in runs if m == method and ("adamw", s) in runs)
    key = f"train_{clock}_seconds"
    ratios = [runs[method, s][key] / runs["adamw", s][key] for s in seeds]
    return (float(np.median(ratios)), seeds) if ratios else (None, [])


def run_grid(args: GlueAccuracyArguments, path: Path) -> None:
    """Every missing (task, method, seed) at budget 'steps' (AdamW first), then at 'equal_time', appended to `path`;
    a line without the flatness figures counts as missing while they are asked for."""
    methods = ["adamw"] + [m for m in args.methods if m != "adamw"]
    budgets = [b for b in BUDGETS if b in args.budgets]
    for budget in budgets:
        for task in args.tasks:
            for seed in args.seeds:
                for method in methods if budget == "steps" else methods[1:]:
                    results = read_jsonl(path)
                    done = latest(results).get((task, method, seed, budget, args.setting))
                    if done and ("sharpness" in done or not args.sharpness_samples):
                        continue
                    extra = {}
                    if budget == "equal_time":
                        adamw = latest(results).get((task, "adamw", seed, "steps", args.setting))
                        ratio, seeds = time_ratio(results, args.setting, task, method, args.budget_clock)
                        if adamw is None or ratio is None:
                            print(f"{task} seed {seed} {method}: equal_time needs its and AdamW's 'steps' runs first")
                            continue
                        extra = {"time_ratio": ratio, "ratio_seeds": seeds,
                                 "max_steps": max(1, round(adamw["steps"] / ratio))}
                    record = train_one(args, task, method, seed, extra.get("max_steps", -1))
                    line = {"task": task, "method": method, "seed": seed, "setting": args.setting, "budget": budget,
                            **extra, **record}
                    with open(path, "a") as f:
                        f.write(json.dumps(line) + "\n")
                    print(f"{task} seed {seed} {method} {budget}: {record['metrics']}, {record['steps']} steps, "
                          f"{record['train_cpu_seconds']:.0f} s CPU, flatness {record.get('sharpness')}", flush=True)


def mean_std_g(values: list) -> str:
    """'mean ± std' with 3 significant digits (the flatness figures span orders of magnitude); '-' if none."""
    return f"{np.mean(values):.3g} ± {np.std(values):.2g}" if values else "-"


def summarize(results: list[dict], setting: str, tasks: list[str], methods: list[str]) -> str:
    """Markdown table per (task, budget, method): mean ± std over seeds of the metrics, training time, steps, active
    parameters and the final model's flatness (dev loss, ascent and random sharpness, top Hessian eigenvalue)."""
    groups = defaultdict(list)
    for budget in ("steps", "equal_time", "time"):
        for r in budget_lines(results, setting, budget):
            if r["task"] in tasks and r["method"] in methods:
                groups[(r["task"], budget, r["method"])].append(r)
    lines = ["| task | budget | method | seeds | accuracy | F1 | train s (wall) | train s (CPU) | steps | active | "
             "dev loss | ascent sharpness | random sharpness | top eigenvalue |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for budget in ("steps", "equal_time", "time"):
            for method in methods:
                runs = groups.get((task, budget, method))
                if not runs:
                    continue
                cells = [mean_std([100 * r["metrics"][key] for r in runs if key in r["metrics"]])
                         for key in ("accuracy", "f1")]
                flat = [mean_std_g([r["sharpness"][key] for r in runs if r.get("sharpness", {}).get(key) is not None])
                        for key in SHARPNESS_KEYS]
                lines.append(
                    f"| {task} | {budget} | {method} | {len(runs)} | {cells[0]} | {cells[1]} | "
                    f"{np.mean([r['train_wall_seconds'] for r in runs]):.0f} | "
                    f"{np.mean([r['train_cpu_seconds'] for r in runs]):.0f} | "
                    f"{np.mean([r['steps'] for r in runs]):.0f} | "
                    f"{mean_percent([r['active_param_ratio'] for r in runs if r['active_param_ratio'] is not None])} | "
                    f"{' | '.join(flat)} |"
                )
    return "\n".join(lines)


def seed_differences(results: list[dict], setting: str, budget: str) -> dict:
    """(task, method) -> d_s, the accuracy of each seed s minus AdamW's of the same seed (points), seeds in order."""
    accuracy = {(r["task"], r["method"], r["seed"]): 100 * r["metrics"]["accuracy"]
                for r in budget_lines(results, setting, budget)}
    differences = defaultdict(list)
    for (task, method, seed), value in sorted(accuracy.items()):
        if method != "adamw" and (task, "adamw", seed) in accuracy:
            differences[task, method].append(value - accuracy[task, "adamw", seed])
    return {key: np.array(d) for key, d in differences.items()}


def paired_differences(results: list[dict], setting: str, tasks: list[str], methods: list[str]) -> str:
    """Markdown table: per (task, budget, method), the accuracy difference to AdamW of the same seed, d_s, with its
    mean and 95 % paired-t interval (n >= 2 seeds)."""
    lines = ["| task | budget | method | paired seeds | difference to AdamW (points) | 95 % interval | per seed |",
             "|---|---|---|---|---|---|---|"]
    for budget in ("steps", "equal_time", "time"):
        differences = seed_differences(results, setting, budget)
        for task in tasks:
            for method in methods:
                d = differences.get((task, method))
                if d is None:
                    continue
                mean, half = paired_interval(d)
                interval = "-" if half is None else f"{mean - half:+.1f} .. {mean + half:+.1f}"
                lines.append(f"| {task} | {budget} | {method} | {d.size} | {mean:+.1f} | {interval} | "
                             f"{', '.join(f'{x:+.1f}' for x in d)} |")
    return "\n".join(lines)


def setting_label(setting: str, task: str) -> str:
    """The task's name, with '_noise<rate>' when the setting flips training labels (sst2, sst2_noise0.2)."""
    noise = [part.split("=")[1] for part in setting.split(",") if part.startswith("label_noise=")]
    return task + "".join(f"_noise{rate}" for rate in noise)


def mean_over_settings(results: list[dict], methods: list[str]) -> str:
    """Markdown table, the grid's decision: per (budget, method), the mean over the settings (a task in one setting,
    e.g. sst2 and sst2_noise0.2) of the mean paired difference to AdamW there, with each setting's difference and its
    number of seeds. A plain mean of the settings run: compare methods over the same settings."""
    lines = ["| budget | method | settings | mean difference to AdamW (points) | per setting (seeds) |",
             "|---|---|---|---|---|"]
    settings = list(dict.fromkeys(r["setting"] for r in results))
    for budget in BUDGETS:
        cells = defaultdict(dict)
        for setting in settings:
            for (task, method), d in seed_differences(results, setting, budget).items():
                cells[method][setting_label(setting, task)] = d
        for method in (m for m in methods if m in cells):
            means = {label: d.mean() for label, d in cells[method].items()}
            per_setting = ", ".join(f"{label} {mean:+.1f} ({cells[method][label].size})"
                                    for label, mean in sorted(means.items()))
            overall = round(np.mean(list(means.values())), 1) + 0.0  # + 0.0: no '-0.0'
            lines.append(f"| {budget} | {method} | {len(means)} | {overall:+.1f} | {per_setting} |")
    return "\n".join(lines)


def plot_task(results: list[dict], setting: str, task: str, methods: list[str], path: Path,
              min_seeds: int = 3) -> list[str]:
    """Accuracy against training CPU time, one line per method with >= `min_seeds` seeds (fewer when no method of the
    task has that many: the largest count there is), from its 'equal_time' to its 'steps' point: mean over seeds with
    the 95 % t interval of the mean as error bars. Returns the methods drawn (none: no file written)."""
    runs_of = {(method, budget): [r for r in budget_lines(results, setting, budget)
                                  if (r["task"], r["method"]) == (task, method)]
               for method in methods for budget in BUDGETS}
    most = max(map(len, runs_of.values()), default=0)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.set_prop_cycle(color=plt.cm.tab20.colors)
    drawn = []
    for method in methods:
        points = []
        for budget in BUDGETS:
            runs = runs_of[method, budget]
            if runs and len(runs) >= min(min_seeds, most):
                accuracy = np.array([100 * r["metrics"]["accuracy"] for r in runs])
                half = paired_interval(accuracy)[1] or 0.0
                points.append((np.mean([r["train_cpu_seconds"] for r in runs]), accuracy.mean(), half))
        if points:
            x, y, err = zip(*sorted(points))
            seeds = max(len(runs_of[method, budget]) for budget in BUDGETS)
            axes.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{method} ({seeds} seeds)")
            drawn.append(method)
    if drawn:
        axes.set(xlabel="training CPU seconds (optimizer steps)", ylabel="dev accuracy (%)",
                 title=f"{path.stem.removeprefix('glue_accuracy_')}: mean over seeds, 95 % interval of the mean")
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    plt.close(figure)
    return drawn


def main(argv: list[str] | None = None):
    """Parse `argv` (default: the command line), run, print this run's tables and write every setting's tables and
    plots."""
    (args,) = HfArgumentParser(GlueAccuracyArguments).parse_args_into_dataclasses(args=argv)
    path = Path(args.output_dir) / "glue_accuracy.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    run_grid(args, path)
    results = read_jsonl(path)
    print(f"setting: {args.setting}\n{summarize(results, args.setting, args.tasks, args.methods)}\n\n"
          f"{paired_differences(results, args.setting, args.tasks, args.methods)}")
    decision = mean_over_settings(results, list(METHODS))
    print(f"\n{decision}")
    sections = [f"Mean over the settings of the paired difference to AdamW:\n\n{decision}\n"]
    for setting in dict.fromkeys(r["setting"] for r in results):
        sections.append(f"setting: `{setting}`\n\n{summarize(results, setting, list(run_glue.TASKS), list(METHODS))}"
                        f"\n\n{paired_differences(results, setting, list(run_glue.TASKS), list(METHODS))}\n")
        for task in run_glue.TASKS:
            plot_task(results, setting, task, list(METHODS),
                      path.parent / f"glue_accuracy_{setting_label(setting, task)}.png")
    (path.parent / "glue_accuracy.md").write_text("\n".join(sections))


if __name__ == "__main__":
    main()
