"""SAMTrainer under FSDP2: one 2-process CPU launch (gloo) runs tests/fsdp_worker.py over every sam_mode x
layer_selection, full and LoRA. Each run must keep the ranks consistent and end with the weights of the same run under
DDP (tests/distributed_worker.py, `launched`); SAM and ASAM, whose ascent FSDP2 averages over processes, with those of
one process on the global batch. Runs resumed from full and sharded checkpoints end as uninterrupted ones, bf16
perturbations leave no trace, and the mixin on TRL's SFTTrainer (a tiny Llama) ends as under DDP."""

import fsdp_worker as worker
import pytest
import torch
from conftest import TESTS, launch, tiny_llama
from distributed_worker import combination_trainer
from test_distributed import group, ranks

from slsam_hf import SAMTrainer
from slsam_hf.checkpoint import SAM_STATE_JSON, lookback_file

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Output folder of one 2-process FSDP2 run of the worker (all scenarios in one process group)."""
    return launch(TESTS / "fsdp_worker.py", tmp_path_factory.mktemp("fsdp"))


def expected_run(launched, tmp_path, combination):
    """(final weights, logged losses, same sums) the FSDP2 run of `combination` must reproduce: the DDP run's (the same
    sums), or for SAM / ASAM, whose ascent FSDP2 averages over processes, one process's on the global batch (sums in
    another order)."""
    if worker.on_global_batch(combination):
        single = combination_trainer(tmp_path, *combination, SAMTrainer, rows=4, dropout=0.0)
        single.train()
        logs = [log["loss"] for log in single.state.log_history if "loss" in log]
        return {n: p.detach() for n, p in single.model.named_parameters()}, logs, False
    (record, tensors), _ = ranks(launched, worker.combination_tag(*combination))
    return group(tensors, "final"), [log["loss"] for log in record["logs"]], True


def assert_same_run(final, expected, same_sums):
    """Equal to 1e-6 where the sums are the same. Where they are summed in another order, AdamW amplifies the last-bit
    differences of the few gradient elements near its eps (asam-all-full on an AVX-512 CPU: one element of 6,354 off by
    1.2e-4 after 3 steps that move the weights by up to 2e-2; 3.5e-5 on another CPU): at most 0.1 % of the elements
    may be off by more than 1e-5, none by more than 1e-3. A wrong ascent (each process's own, the DDP runs of these
    scenarios) puts 5-92 % of them above 1e-5, up to 0.2 away."""
    assert final.keys() == expected.keys()
    if same_sums:
        for name in expected:
            torch.testing.assert_close(final[name], expected[name], atol=1e-6, rtol=1e-4,
                                       msg=lambda m, n=name: f"{n}: {m}")
        return
    diff = torch.cat([(final[name] - expected[name]).abs().flatten() for name in expected])
    share = (diff > 1e-5).float().mean()
    assert diff.max() <= 1e-3 and share <= 1e-3, (
        f"max difference {diff.max():.2e}, {share:.2%} of the elements above 1e-5")


@pytest.mark.parametrize(("mode", "selection", "lora", "accumulation"), worker.COMBINATIONS,
                         ids=[worker.combination_tag(*c) for c in worker.COMBINATIONS])
def test_ranks_agree_and_the_weights_equal_the_reference_run(sharded, launched, tmp_path, mode, selection, lora,
                                                            accumulation):
    (r0, t0), (r1, t1) = ranks(sharded, worker.combination_tag(mode, selection, lora, accumulation))
    for record in (r0, r1):
        assert (record["num_processes"], record["backend"], record["distributed_type"]) == (
            2, "gloo", "DistributedType.FSDP")
        assert record["local_share"] < 0.6, "the parameters are not sharded"
    assert len(r0["steps"]) == len(r1["steps"]) == 3
    for step, (s0, s1) in enumerate(zip(r0["steps"], r1["steps"])):
        assert s0["selected"] == s1["selected"], f"step {step}: ranks selected different arms"
        assert s0["directions"] == s1["directions"], f"step {step}: ranks perturbed along different directions"
        assert s0["update_grad"] == s1["update_grad"], f"step {step}"
        for s in (s0, s1):  # unselected tensors have grad None on every rank after the update pass
            assert s["with_grad"] == s["expected_with_grad"], f"step {step}"
    if selection != "all":
        assert len({tuple(s["selected"]) for s in r0["steps"]}) > 1, "the selection never changed"
    assert r0["probabilities"] == r1["probabilities"] and r0["logs"] == r1["logs"]
    final, initial = group(t0, "final"), group(t0, "initial")
    assert any(not torch.equal(final[n], initial[n]) for n in final), "training moved nothing"
    expected, losses, same_sums = expected_run(launched, tmp_path, (mode, selection, lora, accumulation))
    assert_same_run(final, expected, same_sums)
    assert [log["loss"] for log in r0["logs"]] == pytest.approx(losses, rel=1e-5)


def test_the_reordered_sums_tolerance_refuses_a_wrong_ascent(sharded, launched):
    """Under DDP, SAM and ASAM take each process's own ascent: those runs must fail the check the FSDP2 runs pass."""
    for tag in [worker.combination_tag(*c) for c in worker.COMBINATIONS if worker.on_global_batch(c)]:
        (_, fsdp), _ = ranks(sharded, tag)
        (_, ddp), _ = ranks(launched, tag)
        with pytest.raises(AssertionError, match="of the elements above 1e-5"):
            assert_same_run(group(fsdp, "final"), group(ddp, "final"), same_sums=False)


@pytest.mark.parametrize(("mode", "state_dict_type"), worker.RESUMED,
                         ids=[worker.resumed_tag(*r) for r in worker.RESUMED])
def test_a_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_weights(sharded, mode, state_dict_type):
    folder = sharded / worker.resumed_tag(mode, state_dict_type)
    written = {p.name for p in (folder / "whole" / "checkpoint-2").iterdir()}
    assert SAM_STATE_JSON in written
    lookback = {lookback_file()} if state_dict_type == "FULL_STATE_DICT" else {lookback_file((r, 2)) for r in (0, 1)}
    assert {name for name in written if name.startswith("sam_lookback")} == (lookback if mode == "lookback" else set())
    (r0, t0), (r1, t1) = ranks(sharded, worker.resumed_tag(mode, state_dict_type))
    assert len(r0["steps"]) == 4 and r0["probabilities"] == r1["probabilities"]
    final, resumed = group(t0, "final"), group(t0, "resumed")
    assert final.keys() == resumed.keys()
    for name in final:
        assert torch.equal(final[name], resumed[name]), name
        assert torch.equal(resumed[name], group(t1, "resumed")[name]), name


@pytest.mark.parametrize(("mode", "mixed"), worker.BF16, ids=[worker.bf16_tag(*b) for b in worker.BF16])
def test_bf16_perturbations_and_probes_restore_the_weights_bit_for_bit(sharded, mode, mixed):
    (r0, t0), (r1, _) = ranks(sharded, worker.bf16_tag(mode, mixed))
    assert r0["logs"] == r1["logs"] and len(r0["logs"]) == 3
    final, initial = group(t0, "final"), group(t0, "initial")
    assert {t.dtype for t in initial.values()} == {torch.float32 if mixed else torch.bfloat16}
    for name in initial:  # learning rate 0: only a perturbation left behind could move a weight
        assert torch.equal(final[name], initial[name]), name
    assert sum(log["perturbation_skipped"] for log in r0["logs"]) < len(r0["logs"]), "nothing was perturbed"
    if mode == "sam":
        assert all(log["perturbation_skipped"] == 0 for log in r0["logs"])
        assert any(log["sharpness"] != 0 for log in r0["logs"])  # bf16 losses can round to the same value


def test_the_mixin_on_trls_sft_trainer_equals_its_ddp_run(sharded):
    """SAMTrainerMixin on another Trainer (TRL's SFTTrainer), a tiny Llama with tied embeddings (accelerate shards
    the decoder layers and puts the embeddings with the final norm), the momentum probe."""
    (r0, t0), (r1, _) = ranks(sharded, "sft")
    assert r0["distributed_type"] == "DistributedType.FSDP" and r0["local_share"] < 0.6
    assert r0["logs"] == r1["logs"] and all("loss_perturbed" in log for log in r0["logs"])
    final, ddp = group(t0, "final"), group(t0, "ddp")
    initial = dict(tiny_llama().named_parameters())
    assert final.keys() == ddp.keys() == initial.keys()
    assert any(not torch.equal(final[n], initial[n]) for n in final), "training moved nothing"
    for name in final:
        torch.testing.assert_close(final[name], ddp[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
