"""Worker of tests/test_fsdp.py: the 2-process CPU launch of distributed_worker.py (gloo, accelerate_configs/
cpu_2proc.yaml) with accelerate's FSDP2 path on (`fully_shard` over a CPU mesh), writing the same records per scenario
and rank.

accelerate turns FSDP on only for accelerator devices: on CPU processes (use_cpu) it builds a MULTI_CPU state and
ignores the FSDP plugin, and without use_cpu a machine with no GPU joins no process group at all. `FSDPOnCPU` is the
one test-only change: it marks the joined CPU state as a multi-device one just before the trainer builds its
Accelerator, which then takes the plugin as under `accelerate launch --config_file accelerate_configs/fsdp.yaml` on
GPUs; everything after that (fsdp2_prepare_model, no_sync, clipping, state dicts) is accelerate's and transformers' own
code.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from distributed_worker import RecordingSAMTrainer, combination_tag, combination_trainer, train_and_save  # noqa: E402

# BertLayer only: accelerate's default for BERT also wraps BertEmbeddings, then shards its word embeddings a second time
# (accelerate 1.16 fails with "value was None").
FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}
# (mode, selection, LoRA, gradient accumulation)
COMBINATIONS = [("zo", "bandit", False, 1)]


class FSDPOnCPU:
    """Test-only: lets accelerate enable FSDP on CPU processes joined over gloo (see the module docstring)."""

    def create_accelerator_and_postprocess(self):
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        super().create_accelerator_and_postprocess()


class FSDPRecordingTrainer(FSDPOnCPU, RecordingSAMTrainer):
    pass


def main(output_dir):
    out = Path(output_dir)
    for combination in COMBINATIONS:
        folder = out / combination_tag(*combination)
        train_and_save(folder, combination_trainer(folder / "trainer", *combination, FSDPRecordingTrainer, fsdp=True,
                                                   fsdp_config=dict(FSDP_CONFIG)))


if __name__ == "__main__":
    main(sys.argv[1])
