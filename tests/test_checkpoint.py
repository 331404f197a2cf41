"""Checkpoints: resuming gives the uninterrupted trajectory; missing or tampered SAM state is handled clearly."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import classification_data, sam_args, tiny_bert
from safetensors.torch import load_file

from slsam_hf import SAMTrainer
from slsam_hf.checkpoint import LOOKBACK_SAFETENSORS, SAM_STATE_JSON

HERE = os.path.dirname(__file__)


def run(out, resume=None, **overrides):
    args = sam_args(out, max_steps=6, save_strategy="steps", save_steps=3, logging_steps=2, **overrides)
    trainer = SAMTrainer(model=tiny_bert(), args=args, train_dataset=classification_data(n=48))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ("none", "bandit") is the package default; ("zo", "bandit") the momentum probe with `scale` (its defaults).
RESUMED = [("none", "bandit", {}), ("zo", "bandit", {}), ("lookback", "bandit", {}), ("sam", "random", {}),
           ("sam", "bandit", {"sam_ascent_fraction": 0.5}),
           ("msam", "bandit", {"sparse_update": "momentum", "bandit_reward": "per_parameter"}),
           # checkpoint-3 falls inside a held selection (drawn at step 2, held for steps 2 and 3)
           ("none", "bandit", {"selection_interval": 2, "sparse_update": "scale"})]


@pytest.mark.parametrize("mode, selection, options", RESUMED,
                         ids=[f"{m}-{s}-" + "-".join(f"{k}={v}" for k, v in o.items()) for m, s, o in RESUMED])
def test_resume_at_step_k_equals_uninterrupted_run(tmp_path, mode, selection, options):
    whole = run(tmp_path / "whole", sam_mode=mode, layer_selection=selection, **options)
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert (checkpoint / SAM_STATE_JSON).is_file()
    assert (checkpoint / LOOKBACK_SAFETENSORS).is_file() == (mode == "lookback")
    resumed = run(tmp_path / "resumed", resume=str(checkpoint), sam_mode=mode, layer_selection=selection, **options)
    assert_same(params(whole), params(resumed))
    assert resumed.history.counts == whole.history.counts


def test_checkpoint_without_sam_state_resumes_with_warning_and_fresh_selector(tmp_path, caplog):
    whole = run(tmp_path / "whole", bandit_lr=1.0)
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    os.remove(checkpoint / SAM_STATE_JSON)  # as a stock Trainer would have written it
    with caplog.at_level(logging.WARNING, logger="slsam_hf.trainer"):
        resumed = run(tmp_path / "resumed", resume=str(checkpoint), bandit_lr=1.0)
    assert "has no SAM state" in caplog.text
    # The bandit restarted from uniform probabilities, so the trajectory differs from the uninterrupted one.
    assert any(not torch.equal(a, b) for a, b in zip(params(whole).values(), params(resumed).values()))


@pytest.fixture(scope="module")
def lookback_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("lookback")
    run(out, sam_mode="lookback")
    return out / "checkpoint-3"


@pytest.mark.parametrize("tamper, message", [
    (lambda s: {**s, "arm_names": s["arm_names"][:-1]}, "arms"),
    (lambda s: {**s, "selector": {"probabilities": [0.5] * 3, "num_arms": 3, "budget": 0.2}}, "arm probabilities"),
    (lambda s: {**s, "format": "something else"}, "not a slsam_hf/1 state"),
    (lambda s: "[1, 2", "Expecting"),
])
def test_tampered_sam_state_fails_naming_the_file(tmp_path, lookback_checkpoint, tamper, message):
    checkpoint = shutil.copytree(lookback_checkpoint, tmp_path / "checkpoint-3")
    path = checkpoint / SAM_STATE_JSON
    state = json.loads(path.read_text())
    changed = tamper(state)
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(ValueError, match=message) as err:
        run(tmp_path / "resumed", resume=str(checkpoint), sam_mode="lookback")
    assert SAM_STATE_JSON in str(err.value)


def test_corrupt_lookback_file_fails_naming_the_file(tmp_path, lookback_checkpoint):
    checkpoint = shutil.copytree(lookback_checkpoint, tmp_path / "checkpoint-3")
    (checkpoint / LOOKBACK_SAFETENSORS).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=LOOKBACK_SAFETENSORS):
        run(tmp_path / "resumed", resume=str(checkpoint), sam_mode="lookback")


def worker(out, *extra):
    command = [sys.executable, os.path.join(HERE, "train_worker.py"), "--output_dir", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_sigkill_mid_training_then_resume_equals_uninterrupted(tmp_path):
    whole = worker(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = worker(tmp_path / "killed", "--kill_at_step", "5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "final.safetensors").exists()
    resumed = worker(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same(load_file(tmp_path / "whole" / "final.safetensors"),
                load_file(tmp_path / "killed" / "final.safetensors"))


@pytest.mark.parametrize("changed", [{"layer_selection": "random"}, {"selection_budget": 0.5}])
def test_resume_with_another_selection_option_is_refused(tmp_path, changed):
    run(tmp_path / "whole")  # bandit selection, budget 0.2
    (name, value), = changed.items()
    with pytest.raises(ValueError, match=f"{name}=") as err:
        run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-3"), **changed)
    assert SAM_STATE_JSON in str(err.value) and repr(value) in str(err.value)


def test_state_written_before_the_selection_options_were_stored_still_resumes(tmp_path, lookback_checkpoint):
    old = shutil.copytree(lookback_checkpoint, tmp_path / "old" / "checkpoint-3")
    state = json.loads((old / SAM_STATE_JSON).read_text())
    del state["selection_options"]
    (old / SAM_STATE_JSON).write_text(json.dumps(state))
    resumed_from_old = run(tmp_path / "from_old", resume=str(old), sam_mode="lookback")
    resumed = run(tmp_path / "from_new", resume=str(lookback_checkpoint), sam_mode="lookback")
    assert_same(params(resumed_from_old), params(resumed))
