"""SAMTrainingArguments: defaults, command-line parsing and clear errors for bad values."""

import dataclasses

import pytest
from transformers import HfArgumentParser, TrainingArguments

from slsam_hf import SAMTrainingArguments


def make(**kwargs):
    return SAMTrainingArguments(output_dir="unused", report_to="none", **kwargs)


def test_defaults_are_the_benchmarks_choice():
    """The sparse step without perturbation (benchmarks/README.md 5h); the probe's settings for sam_mode='zo'."""
    args = make()
    assert (args.sam_mode, args.layer_selection, args.sam_rho, args.selection_budget) == ("none", "bandit", 0.05, 0.2)
    assert (args.zo_num_directions, args.zo_eps, args.bandit_lr, args.arm_granularity) == (1, 1e-3, 1e-3, "tensor")
    assert args.always_selected == ["auto"] and args.zo_probe_fraction == 0.25
    assert (args.zo_direction, args.sparse_update, args.sparse_update_max_scale, args.selection_interval) == (
        "momentum", "scale", 10.0, 1)


def test_every_sam_field_has_help_text():
    own = {f.name for f in dataclasses.fields(SAMTrainingArguments)} - {
        f.name for f in dataclasses.fields(TrainingArguments)}
    assert len(own) >= 13
    for f in dataclasses.fields(SAMTrainingArguments):
        if f.name in own:
            assert len(f.metadata.get("help", "")) > 20, f.name


def test_command_line_flags():
    parser = HfArgumentParser(SAMTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", "out", "--sam_mode", "sam", "--layer_selection", "random", "--sam_rho", "0.1",
        "--selection_budget", "0.5", "--arm_granularity", "block",
        "--always_selected", "none", "--bandit_reward", "raw", "--zo_probe_fraction", "0.25",
        "--zo_direction", "momentum", "--sparse_update", "scale", "--sparse_update_max_scale", "4",
        "--selection_interval", "20", "--zo_num_directions", "1",
    ])
    assert (args.sam_mode, args.layer_selection, args.sam_rho, args.selection_budget) == ("sam", "random", 0.1, 0.5)
    assert (args.zo_num_directions, args.arm_granularity, args.always_selected) == (1, "block", ["none"])
    assert (args.zo_direction, args.sparse_update, args.sparse_update_max_scale, args.selection_interval) == (
        "momentum", "scale", 4.0, 20)
    assert (args.bandit_reward, args.zo_probe_fraction) == ("raw", 0.25)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "o", "--always_selected", "classifier", "pooler"])
    assert args.always_selected == ["classifier", "pooler"]
    with pytest.raises(SystemExit):  # argparse rejects values outside the choices
        parser.parse_args_into_dataclasses(["--output_dir", "o", "--sam_mode", "adam"])


@pytest.mark.parametrize("field, value, allowed", [
    ("sam_mode", "adam", "none"), ("layer_selection", "top", "bandit"), ("arm_granularity", "layer", "block"),
    ("bandit_reward", "max", "normalized"), ("sam_rho", -0.1, ">= 0"), ("zo_eps", 0.0, "> 0"),
    ("zo_num_directions", 0, ">= 1"), ("zo_probe_fraction", 0.0, "(0, 1]"), ("zo_probe_fraction", 1.5, "(0, 1]"),
    ("sam_ascent_fraction", 0.0, "(0, 1]"), ("sam_ascent_fraction", 1.5, "(0, 1]"),
    ("selection_budget", 0.0, "(0, 1]"), ("selection_budget", 1.2, "(0, 1]"), ("bandit_lr", -1.0, ">= 0"),
    ("bandit_min_prob", 0.0, "selection_budget"), ("bandit_min_prob", 0.5, "selection_budget"),
    ("sam_cosine_log_steps", -1, ">= 0"), ("sam_mode", "msam2", "msam"), ("zo_direction", "prior", "momentum"),
    ("sparse_update", "carry", "scale"), ("sparse_update_max_scale", 0.5, ">= 1"), ("selection_interval", 0, ">= 1"),
    ("bandit_reward", "rms", "per_parameter"),
])
def test_bad_values_raise_naming_the_field(field, value, allowed):
    with pytest.raises(ValueError, match=field) as err:
        make(**{field: value})
    assert allowed in str(err.value)


def test_find_unused_parameters_defaults_on_with_selection():
    assert make(layer_selection="bandit").ddp_find_unused_parameters is True
    assert make(layer_selection="random").ddp_find_unused_parameters is True
    assert make(layer_selection="all").ddp_find_unused_parameters is None
    assert make(layer_selection="all", ddp_find_unused_parameters=False).ddp_find_unused_parameters is False


@pytest.mark.parametrize("selection", ["bandit", "random"])
def test_find_unused_parameters_off_with_selection_is_refused(selection):
    with pytest.raises(ValueError, match=f"ddp_find_unused_parameters=False cannot be combined with "
                                         f"layer_selection='{selection}'"):
        make(layer_selection=selection, ddp_find_unused_parameters=False)


def test_reentrant_checkpointing_with_partial_selection_is_refused():
    with pytest.raises(ValueError, match="use_reentrant"):
        make(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    make(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}, layer_selection="all")
    make(gradient_checkpointing=True)


def test_momentum_direction_takes_one_probe_direction():
    with pytest.raises(ValueError, match="zo_num_directions must be 1 with zo_direction='momentum'"):
        make(zo_direction="momentum", zo_num_directions=4)
