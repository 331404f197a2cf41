"""SmolLM2-135M-Instruct fine-tuned with LoRA on the shipped instruction data by AdamW, SAM and the default
mode (`sparse_scale`: the SL-SAM bandit's sparse step scaled by 1/p, no perturbation), then evaluated: held-out
loss / perplexity and zero-shot benchmarks (lm-eval's acc and acc_norm with their standard errors), over seeds,
with the paired difference of each method to AdamW.

    HF_HUB_OFFLINE=1 python benchmarks/llm_accuracy.py --seeds 0 1 2 --max_steps 150 --eval_limit 500

Each run is recipes/finetune_llm.py launched with flags (its evaluation is recipes/eval_llm.py's); the untuned
model is evaluated by recipes/eval_llm.py. One line per (method, seed, setting) is appended to
<output_dir>/llm_accuracy.jsonl; lines already there are skipped, so the runs can be done in parts.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from step_cost import LORA, check_names, mean_percent, mean_std, paired_interval, read_jsonl, setting_key
from step_cost import METHODS as COST_METHODS
from transformers import HfArgumentParser

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
METHODS = {name: COST_METHODS[name] for name in ("adamw", "sam", "sparse_scale", "sl_zo", "sl_zo_momentum_probe025")}


@dataclass
class LLMAccuracyArguments:
    methods: list[str] = field(default_factory=lambda: ["adamw", "sam", "sparse_scale"],
                               metadata={"help": f"From {list(METHODS)} (sparse_scale: the default)."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds."})
    max_steps: int = field(default=150, metadata={"help": "Optimizer steps of every run."})
    learning_rate: float = field(default=1e-3, metadata={"help": "LoRA learning rate, the same for every method."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Training batch size."})
    max_seq_length: int = field(default=256, metadata={"help": "Tokens per training record (truncated)."})
    heldout_size: int = field(default=64, metadata={"help": "Instruction records held out for the loss."})
    benchmarks: str = field(default="arc_easy,piqa,hellaswag",
                            metadata={"help": "eval_llm.py benchmarks, comma-separated."})
    eval_limit: int = field(default=500, metadata={"help": "Items per benchmark (the first N)."})
    eval_base: bool = field(default=True, metadata={"help": "Also evaluate the untuned model (method 'base')."})
    output_dir: str = field(default="benchmarks/results", metadata={"help": "Where llm_accuracy.jsonl goes."})

    def __post_init__(self):
        check_names("methods", self.methods, METHODS)

    @property
    def setting(self) -> str:
        """What makes two results comparable besides (method, seed)."""
        return setting_key(self, ("max_steps", "learning_rate", "per_device_train_batch_size", "max_seq_length",
                                  "heldout_size", "benchmarks", "eval_limit"))


def flags(options: dict) -> list[str]:
    """{'max_steps': 3, 'layer_selection': 'all'} -> ['--max_steps', '3', '--layer_selection', 'all']."""
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


def run_recipe(script: str, options: dict, report_file: str) -> dict:
    """Run recipes/<script> with `options` in a fresh process; returns the JSON report it writes to output_dir."""
    command = [sys.executable, str(RECIPES / script), *flags(options)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{script} {options} failed:\n{done.stderr[-4000:]}")
    return json.loads((Path(options["output_dir"]) / report_file).read_text())


def scores(benchmarks: dict) -> dict:
    """lm-eval's per-benchmark results -> {'accuracy': {'arc_easy': 0.61, ...}, 'accuracy_stderr': {...},
    'accuracy_norm': {...}, 'accuracy_norm_stderr': {...}} (acc, acc_norm and their standard errors)."""
    keys = {"accuracy": "acc,none", "accuracy_stderr": "acc_stderr,none", "accuracy_norm": "acc_norm,none",
            "accuracy_norm_stderr": "acc_norm_stderr,none"}
    return {field: {name: values[key] for name, values in benchmarks.items() if key in values}
            for field, key in keys.items()}


def finetune(args: LLMAccuracyArguments, method: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        options = dict(
            output_dir=output_dir, seed=seed, max_steps=args.max_steps, learning_rate=args.learning_rate,
            per_device_train_batch_size=args.per_device_train_batch_size, max_seq_length=args.max_seq_length,
            heldout_size=args.heldout_size, eval_benchmarks=args.benchmarks, eval_limit=args.eval_limit,
            lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], disable_tqdm=True, **METHODS[method],
        )
        report = run_recipe("finetune_llm.py", options, "finetune_report.json")
    return {"heldout_loss": report["heldout_after"]["loss"], "perplexity": report["heldout_after"]["perplexity"],
            **scores(report.get("benchmarks", {})), "train_seconds": report["train_runtime_s"],
            "active_param_ratio": report["sam"]["active_param_ratio"], "steps": report["steps"]}


def evaluate_base(args: LLMAccuracyArguments, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        options = {"output_dir": output_dir, "seed": seed, "heldout_size": args.heldout_size,
                   "max_seq_length": args.max_seq_length, "benchmarks": args.benchmarks, "limit": args.eval_limit}
        report = run_recipe("eval_llm.py", options, "eval_results.json")
    return {"heldout_loss": report["heldout"]["loss"], "perplexity": report["heldout"]["perplexity"],
            **scores(report.get("benchmarks", {})), "train_seconds": 0.0, "steps": 0}


def standard_error(runs: list[dict], name: str) -> str:
    """Mean over runs of lm-eval's standard error of a benchmark's accuracy, in points; '-' if not recorded."""
    errors = [100 * r["accuracy_stderr"][name] for r in runs if name in r.get("accuracy_stderr", {})]
    return f"{np.mean(errors):.1f}" if errors else "-"


def runs_of(results: list[dict], setting: str) -> tuple[dict, list[str], list[str]]:
    """The runs of `setting` by (method, seed) (a rerun replaces a line), its methods (base, then METHODS' order,
    then any other) and the benchmarks they were scored on."""
    runs = {(r["method"], r["seed"]): r for r in results if r["setting"] == setting}
    order = ["base", *METHODS]
    methods = sorted(dict.fromkeys(m for m, _ in runs), key=lambda m: order.index(m) if m in order else len(order))
    names = list(dict.fromkeys(n for r in runs.values() for n in r.get("accuracy", {})))
    return runs, methods, names


def table(results: list[dict], setting: str) -> str:
    """Markdown table per method: mean ± std over seeds, and each benchmark's mean standard error (SE) over items."""
    by_seed, methods, names = runs_of(results, setting)
    lines = ["| method | seeds | held-out loss | perplexity | " + " | ".join(f"{n} acc (SE)" for n in names) +
             " | train s | active |", "|---" * (6 + len(names)) + "|"]
    for method in methods:
        runs = [r for (m, _), r in sorted(by_seed.items()) if m == method]
        accs = [f"{mean_std([100 * r['accuracy'][n] for r in runs if n in r['accuracy']])} ({standard_error(runs, n)})"
                for n in names]
        active = [r.get("active_param_ratio") for r in runs if r.get("active_param_ratio") is not None]
        lines.append(f"| {method} | {len(runs)} | {mean_std([r['heldout_loss'] for r in runs], 3)} | "
                     f"{mean_std([r['perplexity'] for r in runs], 2)} | " + " | ".join(accs) +
                     f" | {np.mean([r['train_seconds'] for r in runs]):.0f} | {mean_percent(active)} |")
    return "\n".join(lines)


def paired_table(results: list[dict], setting: str) -> str:
    """Markdown table per method: the difference to AdamW of the same seed in held-out loss and in each benchmark's
    accuracy (points), mean and 95 % paired-t interval over seeds."""
    runs, methods, names = runs_of(results, setting)
    lines = ["| method | paired seeds | held-out loss − AdamW | " + " | ".join(f"{n} − AdamW" for n in names) + " |",
             "|---" * (3 + len(names)) + "|"]

    def cell(values):
        mean, half = paired_interval(np.asarray(values))
        return f"{mean:+.3g}" + ("" if half is None else f" ({mean - half:+.3g} .. {mean + half:+.3g})")

    for method in methods:
        seeds = sorted(s for m, s in runs if m == method and ("adamw", s) in runs and method != "adamw")
        if not seeds:
            continue
        pairs = [(runs[method, s], runs["adamw", s]) for s in seeds]
        lines.append(f"| {method} | {len(seeds)} | {cell([a['heldout_loss'] - b['heldout_loss'] for a, b in pairs])} | "
                     + " | ".join(cell([100 * (a["accuracy"][n] - b["accuracy"][n]) for a, b in pairs]) for n in names)
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    """Parse `argv` (default: the command line) and run."""
    (args,) = HfArgumentParser(LLMAccuracyArguments).parse_args_into_dataclasses(args=argv)
    path = Path(args.output_dir) / "llm_accuracy.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for seed in args.seeds:
        for method in (["base"] if args.eval_base else []) + args.methods:
            if any(r["method"] == method and r["seed"] == seed and r["setting"] == args.setting
                   for r in read_jsonl(path)):
                continue
            started = time.time()
            result = evaluate_base(args, seed) if method == "base" else finetune(args, method, seed)
            result.update(method=method, seed=seed, setting=args.setting, run_seconds=time.time() - started)
            with open(path, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"{method} seed {seed}: {result}", flush=True)
    results = read_jsonl(path)
    print(f"setting: {args.setting}\n{table(results, args.setting)}\n\n{paired_table(results, args.setting)}")
    (path.parent / "llm_accuracy.md").write_text("\n".join(
        f"setting: `{setting}`\n\n{table(results, setting)}\n\n{paired_table(results, setting)}\n"
        for setting in dict.fromkeys(r["setting"] for r in results)))


if __name__ == "__main__":
    main()
