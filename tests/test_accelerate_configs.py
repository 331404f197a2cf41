"""accelerate_configs/*.yaml load with accelerate's own loader and give `accelerate launch` what their names promise."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

CONFIGS = Path(__file__).resolve().parents[1] / "accelerate_configs"

# file: (distributed_type, mixed_precision, num_processes, use_cpu, processes `accelerate launch` starts)
EXPECTED = {
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, "no", 2, True, 2),  # MULTI_GPU: the torchrun launcher
    "single_gpu_bf16.yaml": (DistributedType.NO, "bf16", 1, False, 1),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, "bf16", 2, False, 2),
    "multi_gpu_fp16.yaml": (DistributedType.MULTI_GPU, "fp16", 2, False, 2),
    "fsdp.yaml": (DistributedType.FSDP, "bf16", 2, False, 2),
    "multi_node.yaml": (DistributedType.MULTI_GPU, "bf16", 16, False, 8),  # 8 processes on each of 2 machines
}


def test_every_config_file_is_checked():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_the_expected_settings(name):
    path = CONFIGS / name
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and len(first_line) > 40, "a one-line comment on when to use it comes first"
    config = load_config_from_file(str(path))  # what `accelerate launch --config_file` reads; rejects unknown keys
    assert isinstance(config, ClusterConfig)
    distributed_type, mixed_precision, num_processes, use_cpu, _ = EXPECTED[name]
    assert config.distributed_type == distributed_type
    assert config.mixed_precision == mixed_precision
    assert config.num_processes == num_processes
    assert config.use_cpu == use_cpu


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_launch_starts_the_expected_processes(name):
    """The launcher `accelerate launch` picks for the file and the environment it gives the training script."""
    # multi_node.yaml as on the second machine (the first one checks that its rendezvous port is free)
    second_machine = ["--machine_rank", "1"] if name == "multi_node.yaml" else []
    parsed = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), *second_machine, "train.py"])
    args, _, _ = _validate_launch_command(parsed)
    _, mixed_precision, _, _, processes = EXPECTED[name]
    if processes > 1:  # torchrun: one process per rank
        env = prepare_multi_gpu_env(args)
        assert int(args.nproc_per_node) == processes
        if second_machine:  # torchrun --nnodes 2 --node_rank 1, meeting the first machine at its address
            assert (args.nnodes, args.node_rank, args.rdzv_endpoint) == ("2", 1, "10.0.0.1:29500")
    else:
        command, env = prepare_simple_launcher_cmd_env(args)
        assert command[-1] == "train.py"
    assert env["ACCELERATE_MIXED_PRECISION"] == mixed_precision
    fsdp = name == "fsdp.yaml"
    assert env.get("ACCELERATE_USE_FSDP") == ("true" if fsdp else None)
    if fsdp:
        assert env["FSDP_VERSION"] == "2" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
