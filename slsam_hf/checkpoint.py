"""Selector, history and lookback state inside a checkpoint folder, in formats that load without running code."""

import glob
import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file

SAM_STATE_JSON = "sam_state.json"
LOOKBACK_SAFETENSORS = "sam_lookback.safetensors"
LOOKBACK_SHARD = "sam_lookback-rank{rank}-of-{world_size}.safetensors"
FORMAT = "slsam_hf/1"


def lookback_file(shard: tuple[int, int] | None = None) -> str:
    """The lookback file's name: whole tensors, or one process's shards (`shard` = (rank, world size): FSDP2 with
    SHARDED_STATE_DICT)."""
    return LOOKBACK_SAFETENSORS if shard is None else LOOKBACK_SHARD.format(rank=shard[0], world_size=shard[1])


def save_sam_state(folder: str, arm_names: list[str], selector, history, lookback: dict[str, torch.Tensor],
                   held: tuple | None = None, selection_options: dict | None = None,
                   optimizer_state: list[str] | None = None) -> None:
    """Write `sam_state.json` (arm names, the options the selector was built with, e.g. layer_selection and
    selection_budget, selector probabilities, selection history, the selection held over `selection_interval`:
    (arm indices, their probabilities when drawn), the trainable tensors that have base-optimizer state) and, for the
    lookback mode, `sam_lookback.safetensors` (the previous update gradient of every tensor that has one;
    `save_lookback`)."""
    os.makedirs(folder, exist_ok=True)
    state = {
        "format": FORMAT,
        "arm_names": arm_names,
        "selection_options": selection_options or {},
        "selector": None if selector is None else selector.state_dict(),
        "history": history.state_dict(),
        "held_selection": None if held is None else {"arms": [int(i) for i in held[0]],
                                                     "probabilities": [float(p) for p in held[1]]},
        "optimizer_state": optimizer_state,
    }
    with open(os.path.join(folder, SAM_STATE_JSON), "w") as f:
        json.dump(state, f)
    save_lookback(folder, lookback)


def save_lookback(folder: str, lookback: dict[str, torch.Tensor], shard: tuple[int, int] | None = None) -> None:
    """Write the lookback gradients (plain tensors: whole, or this process's shards) to `lookback_file(shard)`; nothing
    when there are none."""
    if lookback:
        os.makedirs(folder, exist_ok=True)
        save_file({name: t.detach().contiguous().cpu() for name, t in lookback.items()},
                  os.path.join(folder, lookback_file(shard)))


def has_sam_state(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, SAM_STATE_JSON))


def optimizer_state_names(folder: str) -> set[str] | None:
    """Names of the trainable tensors that had base-optimizer state when `folder` was written; None when the checkpoint
    does not say (no or an older `sam_state.json`; `load_sam_state` checks the file)."""
    if not has_sam_state(folder):
        return None
    with open(os.path.join(folder, SAM_STATE_JSON)) as f:
        names = json.load(f).get("optimizer_state")
    return None if names is None else set(names)


def load_sam_state(folder: str, arm_names: list[str], selector, history, param_names: set[str],
                   selection_options: dict | None = None, shard: tuple[int, int] | None = None) -> tuple:
    """Restore `selector` and `history` in place from `folder`; return (the lookback gradients: name -> CPU tensor,
    whole or, when only this process's shard file exists, its shards; the held selection: (arm indices,
    probabilities) or None). `shard` = (rank, world size) of a process that holds sharded parameters.

    A file that is malformed, describes other arms or was written with other `selection_options`, or lookback shards
    written by another number of processes, raise ValueError naming the file (files written before the options were
    stored are not checked against them).
    """
    path = os.path.join(folder, SAM_STATE_JSON)
    try:
        with open(path) as f:
            state = json.load(f)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} state")
        if state["arm_names"] != arm_names:
            raise ValueError(
                f"it names {len(state['arm_names'])} arms, this model has {len(arm_names)} "
                "(another model, arm_granularity or always_selected?)"
            )
        written = state.get("selection_options", {})
        for name, value in (selection_options or {}).items():
            if written.get(name, value) != value:
                raise ValueError(f"it was written with {name}={written[name]!r}, this run has {name}={value!r}; "
                                 f"resume with the same {name} or start a new run")
        if (state["selector"] is None) != (selector is None):
            raise ValueError("it was written with another layer_selection")
        if selector is not None:
            selector.load_state_dict(state["selector"])
        history.load_state_dict(state["history"])
        held = state.get("held_selection")
        if held is not None:
            arms, probs = np.asarray(held["arms"], dtype=np.int64), np.asarray(held["probabilities"], dtype=np.float64)
            if arms.shape != probs.shape or arms.size == 0 or arms.min() < 0 or arms.max() >= len(arm_names):
                raise ValueError("its held_selection names arms this model does not have")
            held = (arms, probs)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot resume from {path}: {err}") from err
    lookback_path = os.path.join(folder, LOOKBACK_SAFETENSORS)
    if not os.path.isfile(lookback_path) and shard is not None:
        lookback_path = os.path.join(folder, lookback_file(shard))
    if not os.path.isfile(lookback_path):
        written = sorted(glob.glob(os.path.join(folder, LOOKBACK_SHARD.format(rank="*", world_size="*"))))
        if written:
            raise ValueError(f"cannot resume from {folder}: its lookback shards ({os.path.basename(written[0])}, ...) "
                             f"were written by another number of processes; resume with the same world size")
        return {}, held
    try:
        lookback = load_file(lookback_path)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot resume from {lookback_path}: {err}") from err
    unknown = set(lookback) - param_names
    if unknown:
        raise ValueError(f"cannot resume from {lookback_path}: unknown tensors {sorted(unknown)[:3]}")
    return lookback, held
