"""Worker of tests/test_distributed.py: `accelerate launch --config_file accelerate_configs/cpu_2proc.yaml
tests/distributed_worker.py OUTPUT_DIR` trains tiny models with SAMTrainer in one 2-process group (gloo) and writes,
per scenario and rank, `rank{r}.json` (per step: selected arms, digests of the ascent directions and of the update
gradient, zero-order probe losses; logs; bandit probabilities) and `rank{r}.safetensors` (tensors to compare).
"""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from conftest import classification_data, lm_data, sam_args, tiny_bert, tiny_llama  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from slsam_hf import SAMTrainer  # noqa: E402
from slsam_hf.ascent import full, gaussian_like, local  # noqa: E402
from slsam_hf.trainer import derive_seed  # noqa: E402

MODES = ("none", "sam", "asam", "zo", "msam", "lookback")
SELECTIONS = ("all", "random", "bandit")
# Scenarios named like modes that set more options: the first build's Gaussian probe, the momentum-guided probe with
# the momentum sparse-update rule, and the other sparse-update options ("zo" alone is the momentum probe with `scale`,
# the package default before the benchmark grid; "none" with selection is the default now).
VARIANTS = {
    "zo_gaussian": {"sam_mode": "zo", "zo_direction": "gaussian", "sparse_update": "freeze", "zo_probe_fraction": 1.0},
    "zo_momentum": {"sam_mode": "zo", "zo_direction": "momentum", "sparse_update": "momentum"},
    "none_scale_hold": {"sam_mode": "none", "sparse_update": "scale", "selection_interval": 2,
                        "bandit_reward": "per_parameter"},
    "sam_quarter": {"sam_mode": "sam", "sam_ascent_fraction": 0.25, "sparse_update": "scale"},
}
# (mode, selection, LoRA, gradient accumulation): every mode x selection, full and LoRA (also run under FSDP2,
# fsdp_worker.py); COMBINATIONS adds accumulating runs and the variants with selection (the Gaussian probe with every
# selection).
GRID = [(m, s, lora, 1) for lora in (False, True) for m in MODES for s in SELECTIONS]
COMBINATIONS = GRID + [
    ("sam", "bandit", False, 2),
    ("zo", "bandit", False, 2),
    ("zo_gaussian", "bandit", False, 2),
    ("zo_gaussian", "all", False, 1),
    ("zo_gaussian", "all", True, 1),
] + [(v, s, lora, 1) for v in VARIANTS for s in ("random", "bandit") for lora in (False, True)]


def options(mode):
    """SAMTrainingArguments fields of a scenario's mode (a sam_mode or a VARIANTS name)."""
    return VARIANTS.get(mode, {"sam_mode": mode})
# (LoRA, per-device batch, accumulation) of the rho=0 runs compared with one process on the same global batch.
RHO_ZERO_RUNS = [(False, 2, 1), (True, 2, 1), (False, 1, 2)]
ASCENT_RHO = 0.1


def combination_tag(mode, selection, lora, accumulation):
    return f"{mode}-{selection}-{'lora' if lora else 'full'}" + (f"-ga{accumulation}" if accumulation > 1 else "")


def rho_zero_tag(lora, batch_size, accumulation):
    return f"rho0-{'lora' if lora else 'full'}-bs{batch_size}-ga{accumulation}"


def digest(tensors):
    """sha256 of the tensors' bytes (a DTensor's full tensor): equal digests mean bit-identical tensors."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(full(t.detach()).cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RecordingSAMTrainer(SAMTrainer):
    """Records per optimizer step what each rank selected, perturbed along and synchronised."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []
        self._probe_losses = None

    def _begin_step(self):
        super()._begin_step()
        self.steps.append({"selected": self._selected.tolist(), "directions": [], "zo_c": [], "probe_losses": []})

    def _ascent_direction(self, model, inputs, num_items_in_batch):
        step = self.steps[-1]
        self._probe_losses = [] if self.args.sam_mode == "zo" else None
        try:
            params, direction, loss = super()._ascent_direction(model, inputs, num_items_in_batch)
        finally:
            if self._probe_losses is not None:
                step["probe_losses"].append(self._probe_losses)
            self._probe_losses = None
        step["directions"].append(None if direction is None else digest(direction))
        if self.args.sam_mode == "zo" and self.args.zo_direction == "gaussian" and direction is not None:
            step["zo_c"].append(self._zero_order_coefficient(params, direction))
        return params, direction, loss

    def _zero_order_coefficient(self, params, direction):
        """c of the estimate c * u (one direction): u redrawn from the step's seed, c = <g, u> / <u, u>."""
        seed = derive_seed(self.args.seed, self.state.global_step, self._micro_step)
        generators = {}
        u = [gaussian_like(p, generators, seed).double() for p in params]
        dot = full(sum((g.double() * ui).sum() for g, ui in zip(direction, u)))
        return float(dot / full(sum(ui.square().sum() for ui in u)))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._probe_losses is not None:  # this rank's own probe loss, before the reduction
            self._probe_losses.append(loss.item())
        return loss

    def _end_step(self):
        with_grad = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        step = self.steps[-1]
        step["with_grad"] = sorted(n for n, _ in with_grad)
        step["expected_with_grad"] = sorted(self._param_names)
        step["update_grad"] = digest(p.grad for _, p in with_grad)
        super()._end_step()


class ReferenceSAMTrainer(RecordingSAMTrainer):
    """Also keeps, for plain SAM on all tensors, the trainer's first-pass gradient, an independent per-rank
    reference (first-pass gradient on this rank's micro-batch, update gradient at this rank's theta + e) and the
    synchronised update gradient."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tensors = {}

    def training_step(self, model, inputs, num_items_in_batch=None):
        names, params = zip(*[(n, p) for n, p in self.model.named_parameters() if p.requires_grad])
        first = torch.autograd.grad(self.model(**inputs).loss, params)
        norm = torch.cat([g.flatten() for g in first]).norm()
        backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, first):
                p.add_(g * ASCENT_RHO / norm)
        update = torch.autograd.grad(self.model(**inputs).loss, params)
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
        for name, g, u in zip(names, first, update):
            self.tensors[f"first_reference.{name}"] = g
            self.tensors[f"update_reference.{name}"] = u
        return super().training_step(model, inputs, num_items_in_batch)

    def _first_order(self, model, inputs, num_items_in_batch, params):
        grads, loss = super()._first_order(model, inputs, num_items_in_batch, params)
        for name, g in zip(self._param_names, grads):
            self.tensors[f"first_trainer.{name}"] = g.clone()
        return grads, loss

    def _end_step(self):
        for name, p in self.model.named_parameters():
            self.tensors[f"synced.{name}"] = p.grad.clone()
        super()._end_step()


def bert(lora, dropout=0.1):
    model = tiny_bert(dropout=dropout)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                 task_type="SEQ_CLS"))
    return model


def rho_zero_trainer(output_dir, lora, batch_size, accumulation):
    """SAM with rho=0 on all tensors of a tiny Llama, 3 steps over rows in order (global batch: 4 per step on
    2 processes with batch_size * accumulation = 2, or on 1 process with batch_size=4)."""
    model = tiny_llama()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    args = sam_args(output_dir, sam_mode="sam", sam_rho=0.0, layer_selection="all", max_steps=3,
                    per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                    train_sampling_strategy="sequential")
    return RecordingSAMTrainer(model=model, args=args, train_dataset=lm_data())


def combination_trainer(output_dir, mode, selection, lora, accumulation, trainer_class=RecordingSAMTrainer, rows=4,
                        dropout=0.1, **overrides):
    """The trainer of one COMBINATIONS scenario: tiny BERT, 3 steps (unless `overrides` says otherwise) of `rows` rows
    per process."""
    settings = dict(options(mode), layer_selection=selection, max_steps=3, gradient_accumulation_steps=accumulation,
                    per_device_train_batch_size=rows // accumulation)
    args = sam_args(output_dir, **{**settings, **overrides})
    return trainer_class(model=bert(lora, dropout), args=args, train_dataset=classification_data())


def save(folder, trainer, initial, tensors=None):
    """rank{r}.json: process group, steps, logs, probabilities; rank{r}.safetensors: final, initial, extra tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    accelerator = trainer.accelerator
    rank = accelerator.process_index
    params = list(trainer.model.parameters())
    record = {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "backend": accelerator.state.backend,
        "wrapper": type(trainer.model_wrapped).__name__,
        "find_unused_parameters": getattr(trainer.model_wrapped, "find_unused_parameters", None),
        "num_arms": len(trainer.arms),
        "steps": getattr(trainer, "steps", None),  # RecordingSAMTrainer's
        "logs": [log for log in trainer.state.log_history if "loss" in log],
        "probabilities": None if trainer.selector is None else trainer.selector.probabilities.tolist(),
        # share of the parameters' elements this process holds: 1 under DDP, about 1 / world size under FSDP2
        "local_share": sum(t.numel() for t in local(params)) / sum(p.numel() for p in params),
    }
    (folder / f"rank{rank}.json").write_text(json.dumps(record))
    out = {f"final.{n}": full(p.detach()).clone() for n, p in trainer.model.named_parameters()}
    out.update({f"initial.{n}": p for n, p in initial.items()})
    out.update(tensors or {})
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / f"rank{rank}.safetensors"))


def train_and_save(folder, trainer):
    initial = {n: full(p.detach()).clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    save(folder, trainer, initial, getattr(trainer, "tensors", None))


def save_unjoined_error(folder):
    """Without use_cpu on a machine with no GPU, accelerate does not join the launched processes into one group (each
    would train alone): rank{r}.json holds the error SAMTrainer raised, or null."""
    rank = torch.distributed.get_rank()
    args = sam_args(folder / "trainer", use_cpu=False)
    try:
        SAMTrainer(model=tiny_bert(), args=args, train_dataset=classification_data())
        error = None
    except ValueError as e:
        error = str(e)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.json").write_text(json.dumps({"error": error, "world_size": args.world_size}))


def main(output_dir):
    out = Path(output_dir)
    for combination in COMBINATIONS:
        folder = out / combination_tag(*combination)
        train_and_save(folder, combination_trainer(folder / "trainer", *combination))
    for lora, batch_size, accumulation in RHO_ZERO_RUNS:
        tag = rho_zero_tag(lora, batch_size, accumulation)
        train_and_save(out / tag, rho_zero_trainer(out / tag / "trainer", lora, batch_size, accumulation))
    # Plain SAM, no dropout, one step; loss = this rank's mean (no token re-weighting across processes).
    args = sam_args(out / "ascent" / "trainer", sam_mode="sam", sam_rho=ASCENT_RHO, layer_selection="all",
                    max_steps=1, max_grad_norm=0, average_tokens_across_devices=False)
    train_and_save(out / "ascent", ReferenceSAMTrainer(model=tiny_bert(dropout=0.0), args=args,
                                                       train_dataset=classification_data()))
    if not torch.cuda.is_available():
        save_unjoined_error(out / "unjoined")


if __name__ == "__main__":
    main(sys.argv[1])
