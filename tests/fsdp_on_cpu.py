"""Test-only: accelerate's FSDP2 path on CPU processes joined over gloo (tests/fsdp_worker.py, and
benchmarks/step_cost.py --fsdp on a machine without GPUs).

accelerate turns FSDP on only for accelerator devices: on CPU processes (use_cpu) it builds a MULTI_CPU state and
ignores the FSDP plugin, and without use_cpu a machine with no GPU joins no process group at all. `FSDPOnCPU` is the
one change: it marks the joined CPU state as a multi-device one just before the trainer builds its Accelerator, which
then takes the plugin as under `accelerate launch --config_file accelerate_configs/fsdp.yaml` on GPUs; everything after
that (fsdp2_prepare_model, no_sync, clipping, state dicts) is accelerate's and transformers' own code.
"""

from accelerate.state import PartialState
from accelerate.utils import DistributedType


class FSDPOnCPU:
    """Mixin for a Trainer class, before it in the bases: `class T(FSDPOnCPU, SAMTrainer)`."""

    def create_accelerator_and_postprocess(self):
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        super().create_accelerator_and_postprocess()
