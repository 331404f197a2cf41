"""Cost of one optimizer step of each SAM variant against AdamW, measured inside real `SAMTrainer.train()` runs.

    HF_HUB_OFFLINE=1 python benchmarks/step_cost.py --models minilm smollm2-lora --repeats 3

Every (model, method) run is a fresh subprocess, so memory peaks do not mix. The methods are interleaved (their
order rotates every round) and each round's step time is divided by the same round's AdamW time, so slow drifts of a
shared machine cancel; the summary gives the median and the range over rounds. Per method: optimizer-step time
(on_step_begin -> on_step_end, warm-up steps dropped) / AdamW's, peak memory / AdamW's, the trainer's logged
active_param_ratio, forward passes with and without grad and backward passes per step counted with hooks, and the
share of transformer blocks that backward reaches. Writes <output_dir>/<tag>.json and <tag>.png.

With --fsdp every method runs on 2 processes, under DDP and under FSDP2 ('<method>/fsdp'), and FSDP2 is compared with
the same round's DDP run of the method. Without 2 GPUs the processes run on the CPU over gloo, where the test-only
tests/fsdp_on_cpu.py lets accelerate take the FSDP plugin.
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
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    HfArgumentParser,
    TrainerCallback,
)

from slsam_hf import SAMTrainer, SAMTrainingArguments
from slsam_hf.ascent import local
from slsam_hf.assets import MINILM, SMOLLM2, resolve_model

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "data"

# The first build's step (Gaussian probe; unselected tensors frozen), spelled out so that the methods below keep their
# meaning when the defaults of SAMTrainingArguments move.
FIRST_BUILD = {"zo_direction": "gaussian", "sparse_update": "freeze", "zo_probe_fraction": 1.0}

# Benchmark method name -> SAMTrainingArguments fields. ASAM takes a 10x larger rho (see its help text).
METHODS = {
    "adamw": {"sam_mode": "none", "layer_selection": "all"},
    "sam": {"sam_mode": "sam", "layer_selection": "all"},
    "asam": {"sam_mode": "asam", "layer_selection": "all", "sam_rho": 0.5},
    "zo_sam": {"sam_mode": "zo", "layer_selection": "all", **FIRST_BUILD},
    "sl_sam": {"sam_mode": "sam", "layer_selection": "bandit", **FIRST_BUILD},
    "sl_zo": {"sam_mode": "zo", "layer_selection": "bandit", **FIRST_BUILD},
    "sl_lookback": {"sam_mode": "lookback", "layer_selection": "bandit", **FIRST_BUILD},
    "random_zo": {"sam_mode": "zo", "layer_selection": "random", **FIRST_BUILD},
    # The momentum-guided probe and MSAM with the 1/p-scaled sparse update (the candidates of the default).
    "sl_zo_momentum": {"sam_mode": "zo", "zo_direction": "momentum", "layer_selection": "bandit",
                       "sparse_update": "scale", "zo_probe_fraction": 1.0},
    "sl_zo_momentum_probe025": {"sam_mode": "zo", "zo_direction": "momentum", "layer_selection": "bandit",
                                "sparse_update": "scale", "zo_probe_fraction": 0.25},
    "sl_msam": {"sam_mode": "msam", "layer_selection": "bandit", "sparse_update": "scale", "sam_rho": 0.5},
    # The default since the benchmark grid (benchmarks/README.md 5h): the bandit's scaled sparse step, no perturbation.
    "sparse_scale": {"sam_mode": "none", "layer_selection": "bandit", "sparse_update": "scale"},
}

# fsdp_layer: the block FSDP2 shards as one unit (for BERT, accelerate's default also wraps the embeddings and then
# fails to shard the word embeddings a second time).
MODELS = {
    "minilm": {"name": MINILM, "task": "classification", "batch_size": 32, "seq_length": 128, "lora": False,
               "fsdp_layer": "BertLayer"},
    "smollm2-lora": {"name": SMOLLM2, "task": "causal", "batch_size": 4, "seq_length": 256, "lora": True,
                     "fsdp_layer": "LlamaDecoderLayer"},
    "smollm2-full": {"name": SMOLLM2, "task": "causal", "batch_size": 4, "seq_length": 256, "lora": False,
                     "fsdp_layer": "LlamaDecoderLayer"},
}

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}


def method_options(args, method: str) -> dict:
    """SAMTrainingArguments fields of `method`, with the options `args` overrides (those not None)."""
    overrides = ("selection_budget", "arm_granularity", "zo_probe_fraction")
    return {**METHODS[method], **{k: getattr(args, k) for k in overrides if getattr(args, k, None) is not None}}


def check_names(option: str, values: list, allowed) -> None:
    """ValueError naming the unknown entries of a list option such as --methods (shared by the benchmarks)."""
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{option}: unknown {unknown}; choose from {list(allowed)}")


def setting_key(args, names: tuple) -> str:
    """'name=value,...' of the options that make two accuracy results comparable (shared by the benchmarks)."""
    return ",".join(f"{name}={getattr(args, name)}" for name in names)


def mean_std(values: list, digits: int = 1) -> str:
    """'mean ± std' table cell of the accuracy benchmarks; '-' when there are no values."""
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}" if len(values) else "-"


def mean_percent(values: list) -> str:
    """Mean of ratios as a percentage table cell; '-' when there are no values."""
    return f"{np.mean(values):.1%}" if len(values) else "-"


def paired_interval(d: np.ndarray) -> tuple:
    """(mean, half-width of the 95 % paired-t interval t_{0.975, n-1} * std(d, ddof=1) / sqrt(n), None if n < 2)."""
    from scipy import stats

    half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else None
    return d.mean(), half


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL results file (shared by the accuracy benchmarks); [] when it does not exist yet."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


@dataclass
class StepCostArguments:
    models: list[str] = field(
        default_factory=lambda: ["minilm", "smollm2-lora"],
        metadata={"help": f"Models to measure, from {list(MODELS)} (MiniLM: 32 x 128 tokens; SmolLM2: 4 x 256)."},
    )
    methods: list[str] = field(
        default_factory=lambda: list(METHODS), metadata={"help": f"Methods to measure, from {list(METHODS)}."}
    )
    repeats: int = field(default=3, metadata={"help": "Rounds; each round runs every method once, in rotated order."})
    steps: int = field(default=6, metadata={"help": "Timed optimizer steps per run."})
    warmup_steps: int = field(default=2, metadata={"help": "Optimizer steps run before timing starts."})
    batch_size: int | None = field(default=None, metadata={"help": "Override the model's batch size."})
    seq_length: int | None = field(default=None, metadata={"help": "Override the model's sequence length."})
    selection_budget: float | None = field(
        default=None, metadata={"help": "Override every method's selection_budget (default: the method's own)."})
    arm_granularity: str | None = field(
        default=None, metadata={"help": "Override every method's arm_granularity: 'tensor' or 'block'."})
    zo_probe_fraction: float | None = field(
        default=None, metadata={"help": "Override every method's zo_probe_fraction (default: the method's own)."})
    threads: int | None = field(
        default=None,
        metadata={"help": "torch CPU threads per run (default: torch's). 1 makes CPU time a clean measure of work on "
                          "a machine shared with other jobs."},
    )
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (on a GPU)."})
    fsdp: bool = field(
        default=False,
        metadata={"help": "Run every method on 2 processes, under DDP and under FSDP2 ('<method>/fsdp'); time ratios "
                          "are to the same round's DDP AdamW run, and 'vs DDP' to the same method's DDP run."},
    )
    random_init: bool = field(
        default=False,
        metadata={"help": "Build each model from its config with random weights (step cost depends on shapes only)."},
    )
    output_dir: str = field(default="benchmarks/results", metadata={"help": "Where <tag>.json and <tag>.png go."})
    tag: str = field(default="step_cost", metadata={"help": "File name stem of the outputs."})
    worker: str | None = field(
        default=None, metadata={"help": "Internal: measure the single run 'model:method' in this process."}
    )
    worker_output: str | None = field(default=None, metadata={"help": "Internal: file for the worker's record."})

    def __post_init__(self):
        check_names("models", self.models, MODELS)
        check_names("methods", self.methods, METHODS)
        if self.repeats < 1 or self.steps < 1 or self.warmup_steps < 0:
            raise ValueError("repeats and steps must be >= 1, warmup_steps >= 0")


# ------------------------------------------------------------------------------------------------ model and data


def load_model(key: str, random_init: bool = False):
    """(model, tokenizer) of a MODELS entry; LoRA adapters added where the entry asks for them."""
    spec = MODELS[key]
    path = resolve_model(spec["name"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    auto = AutoModelForSequenceClassification if spec["task"] == "classification" else AutoModelForCausalLM
    extra = {"num_labels": 2} if spec["task"] == "classification" else {}
    if random_init:
        model = auto.from_config(AutoConfig.from_pretrained(path, **extra))
    else:
        model = auto.from_pretrained(path, **extra)
    if spec["lora"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    return model, tokenizer


def packed_dataset(tokenizer, task: str, rows: int, length: int, seed: int = 0) -> list[dict]:
    """`rows` blocks of `length` tokens cut from the shipped Alpaca texts (no padding). Classification rows get a
    random label; causal-LM rows predict their own tokens."""
    records = json.loads((DATA_DIR / "instruct" / "alpaca_en_demo.json").read_text())
    text = "\n\n".join(" ".join(r[k] for k in ("instruction", "input", "output") if r[k]) for r in records)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    blocks = np.resize(np.asarray(ids), rows * length).reshape(rows, length).tolist()
    labels = np.random.default_rng(seed).integers(0, 2, rows).tolist() if task == "classification" else blocks
    return [{"input_ids": ids, "attention_mask": [1] * length, "labels": label} for ids, label in zip(blocks, labels)]


# ---------------------------------------------------------------------------------------------------- probes


class StepProbe(TrainerCallback):
    """Per optimizer step after `warmup` steps: wall time (on_step_begin -> on_step_end), forwards with and without
    grad and their time, backward passes, optimizer.step time, and for each backward the share of transformer blocks
    (the longest ModuleList) whose output received a gradient."""

    def __init__(self, model: nn.Module, warmup: int, cuda: bool):
        self.warmup, self.cuda = warmup, cuda
        self.steps = []
        self._step = None
        self._blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)
        model.register_forward_pre_hook(self._forward_begin)
        model.register_forward_hook(self._forward_end)
        for index, block in enumerate(self._blocks):
            block.register_forward_hook(self._block_hook(index))

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step = {"forward_nograd": 0, "forward_grad": 0, "backward": 0, "seconds_forward_nograd": 0.0,
                          "seconds_forward_grad": 0.0, "seconds_optimizer": 0.0, "passes": []}
        self._step["begin"] = self._now()
        self._step["cpu_begin"] = time.process_time()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._optimizer_begin = self._now()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._step["seconds_optimizer"] = self._now() - self._optimizer_begin

    def on_step_end(self, args, state, control, **kwargs):
        step = self._step
        step["seconds"] = self._now() - step.pop("begin")
        step["cpu_seconds"] = time.process_time() - step.pop("cpu_begin")
        depths = [len(p["reached"]) and (len(self._blocks) - min(p["reached"])) / len(self._blocks)
                  for p in step.pop("passes") if p["backward"]]
        step["backward_depth"] = float(np.mean(depths)) if depths else 0.0
        if state.global_step > self.warmup:
            self.steps.append(step)
        self._step = None

    def _forward_begin(self, module, inputs):
        if self._step is not None:
            self._forward_started = self._now()
            if torch.is_grad_enabled():
                self._step["passes"].append({"backward": False, "reached": set()})

    def _forward_end(self, module, inputs, output):
        step = self._step
        if step is None:
            return
        kind = "grad" if torch.is_grad_enabled() else "nograd"
        step[f"forward_{kind}"] += 1
        step[f"seconds_forward_{kind}"] += self._now() - self._forward_started
        loss = getattr(output, "loss", None)
        if kind == "grad" and loss is not None and loss.requires_grad:
            record = step["passes"][-1]
            loss.register_hook(lambda grad: self._backward_begin(record))

    def _backward_begin(self, record):
        record["backward"] = True
        self._step["backward"] += 1

    def _block_hook(self, index):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if self._step is not None and torch.is_grad_enabled() and hidden.requires_grad:
                record = self._step["passes"][-1]
                hidden.register_hook(lambda grad: record["reached"].add(index))

        return hook


def memory_in_use(cuda: bool) -> int:
    """Bytes: allocated CUDA memory, or this process's resident set size."""
    if cuda:
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_memory(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM), Linux >= 4.0
            f.write("5")


def peak_memory(cuda: bool) -> int:
    if cuda:
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


# ------------------------------------------------------------------------------------------------- one run


def trainer_class(backend: str, cuda: bool) -> type:
    """SAMTrainer, or under FSDP2 on CPU processes the test-only subclass that lets accelerate take the FSDP plugin."""
    if backend != "fsdp" or cuda:
        return SAMTrainer
    sys.path.insert(0, str(ROOT / "tests"))
    from fsdp_on_cpu import FSDPOnCPU

    return type("CPUFSDPSAMTrainer", (FSDPOnCPU, SAMTrainer), {})


def measure(args: StepCostArguments, model_key: str, method: str) -> dict:
    """Train `warmup_steps + steps` optimizer steps of one (model, method) and return its cost record; `method` may
    end in '/fsdp' (FSDP2; else DDP when launched on several processes)."""
    spec = MODELS[model_key]
    cuda = torch.cuda.is_available()
    if args.threads:
        torch.set_num_threads(args.threads)
    base, _, backend = method.partition("/")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    batch_size = args.batch_size or spec["batch_size"]
    seq_length = args.seq_length or spec["seq_length"]
    total_steps = args.warmup_steps + args.steps
    model, tokenizer = load_model(model_key, args.random_init)
    dataset = packed_dataset(tokenizer, spec["task"], batch_size * total_steps * processes, seq_length)
    probe = StepProbe(model, args.warmup_steps, cuda)
    fsdp = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": [spec["fsdp_layer"]]}}
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = SAMTrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=total_steps,
            learning_rate=2e-5, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, seed=0, use_cpu=not cuda, bf16=args.bf16,
            **method_options(args, base), **(fsdp if backend == "fsdp" else {}),
        )
        trainer = trainer_class(backend, cuda)(model=model, args=training_args, train_dataset=dataset,
                                               callbacks=[probe])
        baseline = memory_in_use(cuda)
        reset_peak_memory(cuda)
        trainer.train()
        peak = peak_memory(cuda) - baseline
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()  # this process's shards
                      for t in local([t for t in s.values() if torch.is_tensor(t)]))
    logs = [log for log in trainer.state.log_history if "active_param_ratio" in log and log["step"] > args.warmup_steps]
    steps = probe.steps
    return {
        "model": model_key, "method": method, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "processes": processes, "threads": torch.get_num_threads(), "batch_size": batch_size, "seq_length": seq_length,
        "step_seconds": [s["seconds"] for s in steps],
        "seconds": float(np.median([s["seconds"] for s in steps])),
        "cpu_seconds": float(np.median([s["cpu_seconds"] for s in steps])),
        **{key: float(np.mean([s[key] for s in steps])) for key in (
            "forward_nograd", "forward_grad", "backward", "backward_depth", "seconds_forward_nograd",
            "seconds_forward_grad", "seconds_optimizer")},
        "peak_memory_mb": peak / 2**20,
        "optimizer_state_mb": state_bytes / 2**20,
        "active_param_ratio": float(np.mean([log["active_param_ratio"] for log in logs])),
        "selected_arms": float(np.mean([log.get("selected_arms", len(trainer.arms)) for log in logs])),
        "arms": len(trainer.arms),
        "trainable_params": trainer._trainable_numel,
    }


# ---------------------------------------------------------------------------------------------------- driver


def two_process_launcher(bf16: bool) -> list[str]:
    """`accelerate launch` of 2 processes: one per GPU with 2 GPUs, else on the CPU over gloo."""
    config = "multi_gpu.yaml" if torch.cuda.device_count() >= 2 else "cpu_2proc.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / config),
            "--num_processes", "2", "--mixed_precision", "bf16" if bf16 else "no"]


def run_subprocess(argv: list[str], model_key: str, method: str, round_index: int, launcher: list[str]) -> dict:
    """Run `measure` in fresh Python processes (`launcher` + this script, with the driver's options `argv`) and return
    the record of the first."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [*(launcher or [sys.executable]), os.path.abspath(__file__), *argv,
                   "--worker", f"{model_key}:{method}", "--worker_output", out.name]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{model_key}/{method} failed:\n{done.stderr[-4000:]}")
        record = json.loads(Path(out.name).read_text())
    record["round"] = round_index
    return record


def ratio_over_rounds(runs: list[dict], baseline: dict, key: str) -> tuple:
    """(median, [min, max]) over rounds of run[key] / the same round's baseline[key]; (None, None) without baselines."""
    ratios = [r[key] / baseline[r["round"]][key] for r in runs if r["round"] in baseline]
    return (float(np.median(ratios)), [min(ratios), max(ratios)]) if ratios else (None, None)


def summarize(records: list[dict], models: list[str], methods: list[str]) -> list[dict]:
    """Per (model, method): medians over rounds, and time / memory as ratios to the same round's AdamW run (for an
    FSDP2 run '<method>/fsdp', to the DDP AdamW run, and time also to the same round's DDP run of <method>)."""
    rows = []
    for model_key in models:
        runs = [r for r in records if r["model"] == model_key]
        adamw = {r["round"]: r for r in runs if r["method"] == "adamw"}
        for method in methods:
            mine = [r for r in runs if r["method"] == method]
            if not mine:
                continue
            row = {"model": model_key, "method": method, "rounds": len(mine)}
            for key in ("seconds", "cpu_seconds", "peak_memory_mb", "optimizer_state_mb", "active_param_ratio",
                        "forward_nograd", "forward_grad", "backward", "backward_depth", "seconds_forward_nograd",
                        "seconds_forward_grad", "seconds_optimizer", "selected_arms", "arms"):
                row[key] = float(np.median([r[key] for r in mine]))
            row["seconds_range"] = [min(r["seconds"] for r in mine), max(r["seconds"] for r in mine)]
            for key, name in (("seconds", "time_ratio"), ("cpu_seconds", "cpu_time_ratio"),
                              ("peak_memory_mb", "memory_ratio")):
                row[name], row[name + "_range"] = ratio_over_rounds(mine, adamw, key)
            if method.endswith("/fsdp"):
                ddp = {r["round"]: r for r in runs if r["method"] == method.partition("/")[0]}
                for key, name in (("seconds", "ddp_time_ratio"), ("cpu_seconds", "ddp_cpu_time_ratio")):
                    row[name], row[name + "_range"] = ratio_over_rounds(mine, ddp, key)
            rows.append(row)
    return rows


def ratio_text(row: dict, name: str) -> str:
    """'1.23x (1.10-1.31)': the median ratio and its range over rounds; '-' without the runs to compare with."""
    if row.get(name) is None:
        return "-"
    return "{:.2f}x ({:.2f}-{:.2f})".format(row[name], *row[name + "_range"])


def format_table(rows: list[dict]) -> str:
    header = (f"{'model':13} {'method':28} {'step s':>7} {'time/AdamW':>19} {'CPU time/AdamW':>19} {'peak MB':>8} "
              f"{'mem/AdamW':>9} {'active':>7} {'F0':>4} {'F':>4} {'B':>4} {'B depth':>7} {'time/DDP':>19} "
              f"{'CPU time/DDP':>19}")
    lines = [header, "-" * len(header)]
    for r in rows:
        memory = f"{r['memory_ratio']:.2f}x" if r["memory_ratio"] is not None else "-"
        lines.append(
            f"{r['model']:13} {r['method']:28} {r['seconds']:7.3f} {ratio_text(r, 'time_ratio'):>19} "
            f"{ratio_text(r, 'cpu_time_ratio'):>19} {r['peak_memory_mb']:8.0f} {memory:>9} "
            f"{r['active_param_ratio']:7.1%} {r['forward_nograd']:4.1f} {r['forward_grad']:4.1f} {r['backward']:4.1f} "
            f"{r['backward_depth']:7.0%} {ratio_text(r, 'ddp_time_ratio'):>19} {ratio_text(r, 'ddp_cpu_time_ratio'):>19}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], models: list[str], path: str) -> None:
    """Bar chart: wall-clock and CPU step time and peak memory as ratios to AdamW, one row of panels per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("time_ratio", "wall-clock step time"), ("cpu_time_ratio", "CPU time per step"),
              ("memory_ratio", "peak memory"))
    fig, axes = plt.subplots(len(models), len(panels), figsize=(15, 3.4 * len(models)), squeeze=False)
    for axes_row, model_key in zip(axes, models):
        mine = [r for r in rows if r["model"] == model_key and r["time_ratio"] is not None]
        names = [r["method"] for r in mine]
        for ax, (key, title) in zip(axes_row, panels):
            values = np.array([r[key] for r in mine])
            spread = np.array([r[key + "_range"] for r in mine]).reshape(-1, 2).T
            ax.bar(names, values, yerr=np.abs(spread - values), capsize=3, color="tab:blue")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_title(f"{model_key}: {title} / AdamW\n(median, range over rounds)", fontsize=9)
            ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(args: StepCostArguments, records: list[dict], methods: list[str], seconds: float) -> list[dict]:
    """Write <tag>.json (and <tag>.png once AdamW ran) from the records so far; returns the summary rows."""
    rows = summarize(records, args.models, methods)
    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, args.tag)
    result = {"arguments": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
              "wall_seconds": seconds, "summary": rows, "runs": records}
    Path(stem + ".json").write_text(json.dumps(result, indent=1))
    if any(r["time_ratio"] is not None for r in rows):
        plot(rows, [m for m in args.models if any(r["model"] == m for r in rows)], stem + ".png")
    return rows


def main(argv: list[str] | None = None):
    """Parse `argv` (default: the command line) and run."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    (args,) = HfArgumentParser(StepCostArguments).parse_args_into_dataclasses(args=argv)
    if args.worker:
        model_key, method = args.worker.split(":")
        record = measure(args, model_key, method)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.worker_output).write_text(json.dumps(record))
        return
    methods = [m + backend for m in args.methods for backend in (("", "/fsdp") if args.fsdp else ("",))]
    launcher = two_process_launcher(args.bf16) if args.fsdp else None
    records, started = [], time.time()
    for model_key in args.models:
        for round_index in range(args.repeats):
            shift = round_index % len(methods)
            for method in methods[shift:] + methods[:shift]:
                records.append(run_subprocess(argv, model_key, method, round_index, launcher))
                print(f"[{time.time() - started:7.0f}s] {model_key} round {round_index} {method}: "
                      f"{records[-1]['seconds']:.3f} s/step", flush=True)
                rows = save(args, records, methods, time.time() - started)  # partial results survive an interruption
    print(format_table(rows))
    print(f"wrote {os.path.join(args.output_dir, args.tag)}.json/.png")


if __name__ == "__main__":
    main()
