"""SAMTrainer under FSDP2: one 2-process CPU launch (gloo) runs tests/fsdp_worker.py; each run must keep the ranks
consistent and end with the parameters of the same run under DDP (tests/distributed_worker.py, `launched`)."""

import fsdp_worker as worker
import pytest
import torch
from conftest import TESTS, launch
from test_distributed import group, ranks

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Output folder of one 2-process FSDP2 run of the worker (all scenarios in one process group)."""
    return launch(TESTS / "fsdp_worker.py", tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize(("mode", "selection", "lora", "accumulation"), worker.COMBINATIONS,
                         ids=[worker.combination_tag(*c) for c in worker.COMBINATIONS])
def test_ranks_agree_and_the_weights_equal_the_same_run_under_ddp(sharded, launched, mode, selection, lora,
                                                                  accumulation):
    tag = worker.combination_tag(mode, selection, lora, accumulation)
    (r0, t0), (r1, t1) = ranks(sharded, tag)
    for record in (r0, r1):
        assert (record["num_processes"], record["backend"], record["distributed_type"]) == (
            2, "gloo", "DistributedType.FSDP")
        assert record["local_share"] < 0.6, "the parameters are not sharded"
    for step, (s0, s1) in enumerate(zip(r0["steps"], r1["steps"], strict=True)):
        assert s0["selected"] == s1["selected"], f"step {step}: ranks selected different arms"
        assert s0["directions"] == s1["directions"], f"step {step}: ranks perturbed along different directions"
        for s in (s0, s1):
            assert s["with_grad"] == s["expected_with_grad"], f"step {step}"
    assert r0["probabilities"] == r1["probabilities"] and r0["logs"] == r1["logs"]
    (d0, ddp), _ = ranks(launched, tag)
    assert [s["selected"] for s in r0["steps"]] == [s["selected"] for s in d0["steps"]]
    final, expected = group(t0, "final"), group(ddp, "final")
    assert final.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(final[n], group(t0, "initial")[n]) for n in final), "training moved nothing"
