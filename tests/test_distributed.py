"""SAMTrainer under DDP: one `accelerate launch` of 2 CPU processes (gloo, accelerate_configs/cpu_2proc.yaml) runs
tests/distributed_worker.py over every sam_mode x layer_selection, full and LoRA; the tests compare the ranks' records
with each other, with a 1-process run and with independent per-rank reference gradients."""

import json

import distributed_worker as worker
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess  # `launched` (conftest.py): the worker's output folder


def ranks(out, tag):
    """[(record, tensors)] of rank 0 and rank 1."""
    folder = out / tag
    return [(json.loads((folder / f"rank{r}.json").read_text()), load_file(folder / f"rank{r}.safetensors"))
            for r in (0, 1)]


def group(tensors, prefix):
    """The tensors saved under `prefix.`, by parameter name."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def flat(tensors):
    return torch.cat([t.flatten() for _, t in sorted(tensors.items())])


def assert_moved(tensors):
    final, initial = group(tensors, "final"), group(tensors, "initial")
    assert any(not torch.equal(final[n], initial[n]) for n in final), "training did not move any parameter"


@pytest.mark.parametrize(("mode", "selection", "lora", "accumulation"), worker.COMBINATIONS,
                         ids=[worker.combination_tag(*c) for c in worker.COMBINATIONS])
def test_ranks_draw_the_same_arms_and_directions_and_end_bit_identical(launched, mode, selection, lora, accumulation):
    (r0, t0), (r1, t1) = ranks(launched, worker.combination_tag(mode, selection, lora, accumulation))
    mode = worker.options(mode)["sam_mode"]
    for record in (r0, r1):
        assert (record["num_processes"], record["backend"], record["wrapper"]) == (2, "gloo", "DistributedDataParallel")
    if selection != "all":
        assert r0["find_unused_parameters"], "toggling requires_grad needs find_unused_parameters"
    assert len(r0["steps"]) == len(r1["steps"]) == 3
    for step, (s0, s1) in enumerate(zip(r0["steps"], r1["steps"])):
        assert s0["selected"] == s1["selected"], f"step {step}: ranks selected different arms"
        if selection == "all":
            assert s0["selected"] == list(range(r0["num_arms"]))
        else:
            assert 0 < len(s0["selected"]) < r0["num_arms"]
        for s in (s0, s1):  # unselected tensors have grad None (not zeros) on every rank after the update pass
            assert s["with_grad"] == s["expected_with_grad"], f"step {step}"
        assert s0["update_grad"] == s1["update_grad"], f"step {step}: update gradients not synchronised"
        assert len(s0["directions"]) == (0 if mode == "none" else accumulation)
        if mode in ("sam", "asam"):  # the ascent pass is per process: the ranks' micro-batches differ
            assert all(d0 is not None and d0 != d1 for d0, d1 in zip(s0["directions"], s1["directions"])), step
        else:
            assert s0["directions"] == s1["directions"], f"step {step}: ranks perturbed along different directions"
    if mode == "lookback":
        assert r0["steps"][0]["directions"] == [None] and None not in r0["steps"][2]["directions"]
    if selection != "all":
        assert len({tuple(s["selected"]) for s in r0["steps"]}) > 1, "the selection never changed"
    assert r0["probabilities"] == r1["probabilities"]
    if selection == "bandit":
        assert len(set(r0["probabilities"])) > 1, "the bandit never learned"
    assert r0["logs"] == r1["logs"] and len(r0["logs"]) == 3
    final0, final1 = group(t0, "final"), group(t1, "final")
    assert final0.keys() == final1.keys()
    for name in final0:
        assert torch.equal(final0[name], final1[name]), f"{name} differs between the ranks"
    assert_moved(t0)


ZERO_ORDER = [c for c in worker.COMBINATIONS if worker.options(c[0]).get("zo_direction") == "gaussian"]


@pytest.mark.parametrize(("mode", "selection", "lora", "accumulation"), ZERO_ORDER,
                         ids=[worker.combination_tag(*c) for c in ZERO_ORDER])
def test_zero_order_losses_are_averaged_over_processes_before_the_direction(launched, mode, selection, lora,
                                                                           accumulation):
    (r0, _), (r1, _) = ranks(launched, worker.combination_tag(mode, selection, lora, accumulation))
    eps = 1e-3  # zo_eps default
    local_errors = []  # |c - c of one rank's own losses|
    for s0, s1 in zip(r0["steps"], r1["steps"]):
        for c0, c1, losses0, losses1 in zip(s0["zo_c"], s1["zo_c"], s0["probe_losses"], s1["probe_losses"]):
            (plus0, minus0), (plus1, minus1) = losses0, losses1  # one direction: l(theta + eps u), l(theta - eps u)
            assert (plus0, minus0) != (plus1, minus1), "the ranks probed the same rows"
            assert c0 == c1
            averaged = ((plus0 + plus1) / 2 - (minus0 + minus1) / 2) / (2 * eps)
            assert c0 == pytest.approx(averaged, abs=2e-4)
            local_errors.append([abs(c0 - (plus - minus) / (2 * eps)) for plus, minus in (losses0, losses1)])
    assert len(local_errors) == 3 * accumulation
    assert min(map(max, zip(*local_errors))) > 0.02, "c is what one rank's losses alone give"


def test_sam_ascent_is_per_process_and_the_update_gradient_is_averaged(launched):
    (r0, t0), (r1, t1) = ranks(launched, "ascent")
    first = [group(t, "first_reference") for t in (t0, t1)]
    for reference, tensors in zip(first, (t0, t1)):
        got = group(tensors, "first_trainer")
        assert got.keys() == reference.keys()
        for name in reference:  # the trainer's ascent gradient is this rank's own, not all-reduced
            torch.testing.assert_close(got[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.allclose(flat(first[0]), flat(first[1]), rtol=1e-3), "the ranks saw the same data"
    update = [group(t, "update_reference") for t in (t0, t1)]
    synced0, synced1 = group(t0, "synced"), group(t1, "synced")
    assert synced0.keys() == update[0].keys()
    for name in synced0:  # each rank's gradient at its own theta + e, averaged by DDP
        assert torch.equal(synced0[name], synced1[name]), name
        expected = (update[0][name] + update[1][name]) / 2
        torch.testing.assert_close(synced0[name], expected, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.allclose(flat(synced0), flat(update[0]), rtol=1e-3)
    assert r0["steps"][0]["directions"] != r1["steps"][0]["directions"]
    for name, p in group(t0, "final").items():
        assert torch.equal(p, group(t1, "final")[name]), name


@pytest.mark.parametrize(("lora", "batch_size", "accumulation"), worker.RHO_ZERO_RUNS,
                         ids=[worker.rho_zero_tag(*r) for r in worker.RHO_ZERO_RUNS])
def test_rho_zero_on_two_processes_equals_one_process_on_the_global_batch(launched, tmp_path, lora, batch_size,
                                                                         accumulation):
    """Accelerate shards whole per-device batches over the ranks in turn (split_batches=False): with sequential
    sampling, step t of 2 ranks x batch_size x accumulation = 4 rows covers rows 4t..4t+3, as batch t of 1 process
    with batch size 4 does. Token-averaged causal-LM losses make the two gradients equal up to rounding."""
    (r0, t0), (r1, t1) = ranks(launched, worker.rho_zero_tag(lora, batch_size, accumulation))
    final0, final1 = group(t0, "final"), group(t1, "final")
    single = worker.rho_zero_trainer(tmp_path, lora, batch_size=4, accumulation=1)
    single.train()
    expected = {n: p.detach() for n, p in single.model.named_parameters()}
    assert final0.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final0[name], final1[name]), name
        torch.testing.assert_close(final0[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    single_losses = [log["loss"] for log in single.state.log_history if "loss" in log]
    assert [log["loss"] for log in r0["logs"]] == pytest.approx(single_losses, rel=1e-5)
    assert_moved(t0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, use_cpu=False makes the processes join over NCCL")
def test_processes_left_out_of_the_process_group_are_refused(launched):
    """cpu_2proc.yaml without use_cpu on a machine with no GPU: accelerate starts 2 processes but makes no process
    group, so each would train alone (and write the same output_dir); SAMTrainer must refuse with what to do."""
    for rank in (0, 1):
        record = json.loads((launched / "unjoined" / f"rank{rank}.json").read_text())
        assert record["world_size"] == 1
        assert record["error"] is not None and "use_cpu" in record["error"], "2 independent runs went unnoticed"
