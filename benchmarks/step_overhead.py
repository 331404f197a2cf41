"""CPU time SAMTrainer spends outside the forward and backward passes per optimizer step, and its host syncs.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/step_overhead.py --models smollm2-lora minilm

In one process with one torch thread, per model: a stock `Trainer` (AdamW) run and a `SAMTrainer` run in the default
mode (sam_mode='zo', zo_direction='momentum', layer_selection='bandit', sparse_update='scale',
zo_probe_fraction=0.25). Per timed optimizer step, on the thread's CPU clock:

    step     = on_step_begin -> on_step_end (the whole optimizer step);
    outside  = time in `training_step` - time in model forwards and backwards inside it
               + time in SAMTrainer's optimizer step hooks (sparse update);
    overhead = outside(SAMTrainer) - outside(Trainer): the work SAMTrainer adds around the passes.

Host syncs are the calls, during the timed steps and outside the passes, of the Tensor methods that make a GPU
wait (`item`, `tolist`, `cpu`, `__float__`, `__int__`, `__bool__`), counted by monkeypatching, with the code line
that made each (the record holds the count over the timed steps per line). The time `SelectionHistory.save` takes at
a checkpoint is measured once after training. Writes <output_dir>/<tag>.json.
"""

import collections
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from slsam_hf import SAMTrainer, SAMTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import MODELS, check_names, load_model, packed_dataset  # noqa: E402

SYNC_METHODS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__")


@dataclass
class StepOverheadArguments:
    models: list[str] = field(
        default_factory=lambda: ["smollm2-lora", "minilm"],
        metadata={"help": f"Models to measure, from {list(MODELS)} (their batch size and sequence length)."},
    )
    steps: int = field(default=3, metadata={"help": "Timed optimizer steps per run."})
    warmup_steps: int = field(
        default=2, metadata={"help": "Optimizer steps run before timing starts (the first has no AdamW state)."})
    output_dir: str = field(default="benchmarks/results", metadata={"help": "Where <tag>.json goes."})
    tag: str = field(default="step_overhead", metadata={"help": "File name stem of the output."})

    def __post_init__(self):
        check_names("models", self.models, MODELS)
        if self.steps < 1 or self.warmup_steps < 1:
            raise ValueError("steps and warmup_steps must be >= 1")


class Clock:
    """Thread CPU time per optimizer step: the step, `training_step`, the passes inside it, the optimizer hooks; and
    the host syncs made while a timed step runs."""

    def __init__(self, trainer: Trainer, warmup: int):
        self.warmup, self.steps, self.step, self.syncs = warmup, [], None, collections.Counter()
        self._depth = 0  # > 0 inside a pass (a forward or a backward), so nested calls are not counted twice
        trainer.model.register_forward_pre_hook(lambda *_: self._enter())
        trainer.model.register_forward_hook(lambda *_: self._leave("passes"))
        trainer.training_step = self._timed(trainer.training_step, "training_step")
        trainer.accelerator.backward = self._pass(trainer.accelerator.backward)
        for name in ("_before_optimizer_step", "_after_optimizer_step"):
            if hasattr(trainer, name):
                setattr(trainer, name, self._timed(getattr(trainer, name), "hooks"))

    def _enter(self):
        self._depth += 1
        if self._depth == 1:
            self._started = time.thread_time()

    def _leave(self, key):
        self._depth -= 1
        if self._depth == 0 and self.step is not None:
            self.step[key] += time.thread_time() - self._started

    def _pass(self, function):
        def timed(*args, **kwargs):
            self._enter()
            try:
                return function(*args, **kwargs)
            finally:
                self._leave("passes")

        return timed

    def _timed(self, function, key):
        def timed(*args, **kwargs):
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                if self.step is not None:
                    self.step[key] += time.thread_time() - started

        return timed

    def callback(self) -> TrainerCallback:
        clock = self

        class Steps(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step >= clock.warmup:
                    clock.step = {"step": -time.thread_time(), "training_step": 0.0, "passes": 0.0, "hooks": 0.0}

            def on_step_end(self, args, state, control, **kwargs):
                if clock.step is not None:
                    clock.step["step"] += time.thread_time()
                    clock.steps.append(clock.step)
                    clock.step = None

        return Steps()

    def count_syncs(self):
        """Wraps the SYNC_METHODS of torch.Tensor so that calls during a timed step are counted by caller line."""
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))

    def _counted(self, method):
        def counted(tensor, *args, **kwargs):
            if self.step is not None and self._depth == 0:
                caller = sys._getframe(1)
                where = f"{os.path.relpath(caller.f_code.co_filename)}:{caller.f_lineno}"
                self.syncs[f"{method.__name__} {where}"] += 1
            return method(tensor, *args, **kwargs)

        return counted


def measure(args: StepOverheadArguments, model_key: str, sam: bool) -> dict:
    """Train `warmup_steps + steps` steps of `model_key` with SAMTrainer's default mode (`sam`) or stock Trainer."""
    spec = MODELS[model_key]
    total = args.warmup_steps + args.steps
    model, tokenizer = load_model(model_key)
    dataset = packed_dataset(tokenizer, spec["task"], spec["batch_size"] * total, spec["seq_length"])
    saved = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
    with tempfile.TemporaryDirectory() as output_dir:
        options = dict(output_dir=output_dir, per_device_train_batch_size=spec["batch_size"], max_steps=total,
                       learning_rate=2e-5, logging_steps=total, save_strategy="no", report_to="none",
                       disable_tqdm=True, dataloader_num_workers=0, seed=0, use_cpu=True)
        if sam:
            trainer = SAMTrainer(model=model, args=SAMTrainingArguments(**options), train_dataset=dataset)
        else:
            trainer = Trainer(model=model, args=TrainingArguments(**options), train_dataset=dataset)
        clock = Clock(trainer, args.warmup_steps)
        trainer.add_callback(clock.callback())
        clock.count_syncs()
        try:
            trainer.train()
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)
        history_save = None
        if sam:
            started = time.thread_time()
            trainer.history.save(output_dir)
            history_save = time.thread_time() - started
    steps = clock.steps
    mean = {key: float(np.mean([s[key] for s in steps])) for key in steps[0]}
    return {
        "model": model_key, "trainer": "SAMTrainer (default)" if sam else "Trainer (AdamW)",
        "arms": len(trainer.arms) if sam else None, "step_seconds": [s["step"] for s in steps],
        "step": mean["step"], "passes": mean["passes"],
        "outside": mean["training_step"] - mean["passes"] + mean["hooks"], "hooks": mean["hooks"],
        "syncs_per_step": sum(clock.syncs.values()) / len(steps), "syncs": dict(clock.syncs.most_common()),
        "history_save_seconds": history_save,
    }


def summarize(records: list[dict]) -> list[dict]:
    """Per model: AdamW step time, SAMTrainer's added time outside the passes (absolute and / AdamW step), syncs."""
    rows = []
    for model_key in dict.fromkeys(r["model"] for r in records):
        adamw, sam = (next(r for r in records if r["model"] == model_key and (r["arms"] is None) == stock)
                      for stock in (True, False))
        overhead = sam["outside"] - adamw["outside"]
        rows.append({"model": model_key, "arms": sam["arms"], "adamw_step_ms": 1e3 * adamw["step"],
                     "overhead_ms": 1e3 * overhead, "overhead_share": overhead / adamw["step"],
                     "adamw_syncs": adamw["syncs_per_step"], "sam_syncs": sam["syncs_per_step"],
                     "history_save_ms": 1e3 * sam["history_save_seconds"]})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| model | arms | AdamW step (CPU ms) | SAMTrainer overhead (ms) | / AdamW step | host syncs per step "
             "(Trainer / SAMTrainer) | history save (ms) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['arms']} | {r['adamw_step_ms']:.0f} | {r['overhead_ms']:.1f} | "
              f"{r['overhead_share']:.2%} | {r['adamw_syncs']:g} / {r['sam_syncs']:g} | {r['history_save_ms']:.0f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    """Parse `argv` (default: the command line) and run."""
    (args,) = HfArgumentParser(StepOverheadArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)
    started = time.time()
    records = [measure(args, model_key, sam) for model_key in args.models for sam in (False, True)]
    rows = summarize(records)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"{args.tag}.json")
    Path(path).write_text(json.dumps({"arguments": vars(args), "wall_seconds": time.time() - started,
                                      "summary": rows, "runs": records}, indent=1))
    print(format_table(rows))
    for record in records:
        print(f"{record['model']} {record['trainer']}: syncs over the {args.steps} timed steps, by caller: "
              f"{record['syncs']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
