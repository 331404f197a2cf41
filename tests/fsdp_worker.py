"""Worker of tests/test_fsdp.py: the 2-process CPU launch of distributed_worker.py (gloo, accelerate_configs/
cpu_2proc.yaml) with accelerate's FSDP2 path on (`fully_shard` over a CPU mesh, through the test-only `FSDPOnCPU`),
writing the same records per scenario and rank.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from conftest import classification_data, sam_args  # noqa: E402
from distributed_worker import (  # noqa: E402
    GRID,
    RecordingSAMTrainer,
    bert,
    combination_tag,
    combination_trainer,
    options,
    save,
    train_and_save,
)
from fsdp_on_cpu import FSDPOnCPU  # noqa: E402
from test_trl import SAMSFTTrainer  # noqa: E402
from test_trl import run as train_sft  # noqa: E402

from slsam_hf.ascent import full  # noqa: E402

# BertLayer only: accelerate's default for BERT also wraps BertEmbeddings, then shards its word embeddings a second time
# (accelerate 1.16 fails with "value was None").
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}
# (mode, selection, LoRA, gradient accumulation): every mode x selection, full and LoRA, accumulating runs, the
# Gaussian probe (sharded draws), the momentum sparse update and a held selection; each also runs in distributed_worker.
COMBINATIONS = GRID + [
    ("sam", "bandit", False, 2),
    ("zo", "bandit", False, 2),
    ("zo_gaussian", "all", False, 1),
    ("zo_gaussian", "bandit", True, 1),
    ("zo_momentum", "bandit", False, 1),
    ("none_scale_hold", "random", True, 1),
]
# Under FSDP2 all processes share one theta, so the SAM / ASAM ascent is the gradient averaged over processes, where DDP
# takes each process's own: these runs compare with one process on the global batch instead (test_fsdp.py), with
# dropout off, 2 rows per process and the loss each process's mean.
GLOBAL_BATCH = {"rows": 2, "dropout": 0.0, "average_tokens_across_devices": False}


def on_global_batch(combination):
    """Whether the scenario's ascent is averaged over processes (SAM, ASAM), so that it compares with one process."""
    return options(combination[0])["sam_mode"] in ("sam", "asam")


# (mode, FSDP state dict type) of the runs stopped at step 2 and resumed from that checkpoint (bandit selection).
RESUMED = [("lookback", "FULL_STATE_DICT"), ("lookback", "SHARDED_STATE_DICT"), ("zo", "FULL_STATE_DICT")]
# (mode, mixed) of the bf16 runs at learning rate 0: "mixed" shards stay fp32, FSDP2 gathers them in bf16 and
# reduce-scatters gradients in fp32; otherwise the weights themselves are bf16. Each step perturbs (and probes) and
# restores, so the weights must end as they began, bit for bit.
BF16 = [("sam", True), ("zo_gaussian", True), ("zo_gaussian", False)]


class FSDPRecordingTrainer(FSDPOnCPU, RecordingSAMTrainer):
    pass


class FSDPSAMSFTTrainer(FSDPOnCPU, SAMSFTTrainer):
    pass


def fsdp_trainer(output_dir, combination, state_dict_type="FULL_STATE_DICT", **overrides):
    """`combination_trainer` under FSDP2."""
    return combination_trainer(output_dir, *combination, FSDPRecordingTrainer, fsdp=True,
                               fsdp_config={**FSDP_CONFIG, "state_dict_type": state_dict_type}, **overrides)


def resumed_tag(mode, state_dict_type):
    return f"resume-{mode}-{state_dict_type.split('_')[0].lower()}"


def train_and_resume(folder, mode, state_dict_type):
    """4 steps with a checkpoint every 2 (`whole`), then a fresh trainer resumed from checkpoint-2 (`resumed`): saves
    the first's records, its final weights and the second's as `resumed.*`."""
    checkpoints = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    whole = fsdp_trainer(folder / "whole", (mode, "bandit", False, 1), state_dict_type, **checkpoints)
    initial = {n: p.detach().clone() for n, p in whole.model.named_parameters()}
    whole.train()
    resumed = fsdp_trainer(folder / "resumed", (mode, "bandit", False, 1), state_dict_type, **checkpoints)
    resumed.train(resume_from_checkpoint=str(folder / "whole" / "checkpoint-2"))
    save(folder, whole, initial, {f"resumed.{n}": full(p.detach()) for n, p in resumed.model.named_parameters()})


def bf16_tag(mode, mixed):
    return f"bf16-{mode}-{'mixed' if mixed else 'weights'}"


def bf16_trainer(output_dir, mode, mixed):
    """BF16 scenario: bandit selection, learning rate 0."""
    model = bert(False) if mixed else bert(False).to(torch.bfloat16)
    args = sam_args(output_dir, **options(mode), learning_rate=0.0, max_steps=3, bf16=mixed, fsdp=True,
                    fsdp_config=dict(FSDP_CONFIG))
    if mixed:  # accelerate's bf16 default reduces in bf16; an FSDP plugin built in Python can reduce in fp32
        args.fsdp_plugin_args["mixed_precision_policy"] = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32,
                                                            "output_dtype": torch.bfloat16}
    return FSDPRecordingTrainer(model=model, args=args, train_dataset=classification_data())


def sft_under_ddp_and_fsdp(folder):
    """The mixin on TRL's SFTTrainer (tiny Llama with tied embeddings, the momentum probe) under DDP, then FSDP2
    (blocks sharded by accelerate's default policy): saves the FSDP2 run's records and the DDP run's weights as
    `ddp.*`."""
    ddp = train_sft(SAMSFTTrainer, folder / "ddp", sam_mode="zo")
    tensors = {f"ddp.{n}": p.detach().clone() for n, p in ddp.model.named_parameters()}
    sharded = train_sft(FSDPSAMSFTTrainer, folder / "fsdp", sam_mode="zo", fsdp=True, fsdp_config={"version": 2})
    save(folder, sharded, {}, tensors)


def main(output_dir):
    out = Path(output_dir)
    for combination in COMBINATIONS:
        folder = out / combination_tag(*combination)
        settings = GLOBAL_BATCH if on_global_batch(combination) else {}
        train_and_save(folder, fsdp_trainer(folder / "trainer", combination, **settings))
    for mode, state_dict_type in RESUMED:
        train_and_resume(out / resumed_tag(mode, state_dict_type), mode, state_dict_type)
    for mode, mixed in BF16:
        folder = out / bf16_tag(mode, mixed)
        train_and_save(folder, bf16_trainer(folder / "trainer", mode, mixed))
    sft_under_ddp_and_fsdp(out / "sft")


if __name__ == "__main__":
    main(sys.argv[1])
