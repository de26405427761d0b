"""Replicas that drift apart under DistributedDataParallel (two gloo processes under torchrun): each bug
reproduced the way users hit it is named with its cause, where a check of the loop shows it, and the healthy
twin stays silent. One torchrun job runs them all (tests/replicas_twin.py)."""

import json

import pytest
from conftest import ROOT, run_script

from gradwatch.replicas import TOLERANCE, facts

SCRIPT = ROOT / "tests" / "replicas_twin.py"


@pytest.fixture(scope="module")
def told(tmp_path_factory):
    out = tmp_path_factory.mktemp("replicas")
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", SCRIPT, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}


def first(findings):
    return next(f for f in findings if f["cause"] is None)


def test_the_healthy_twin_draws_nothing_and_states_its_facts(told):
    assert told["healthy"]["findings"] == [] and told["hsdp_healthy"]["findings"] == []
    assert told["healthy"]["facts"]["model"]["optimizer"]["class"] == "SGD"


@pytest.mark.parametrize(
    "bug, part, cause",
    [
        ("unwrapped", "gradients", "called the model inside DistributedDataParallel directly"),
        ("moved", "gradients", "moved to another dtype or device after DistributedDataParallel wrapped it"),
        ("no_sync", "gradients", "ran every forward pass under no_sync()"),
        ("loaded_on_one_rank", "weights", "while their gradients agree"),
        ("hsdp_loaded_on_one_rank", "weights", "while their gradients agree"),  # FSDP2's replicate dimension
    ],
)
def test_replicas_that_differ_are_named_with_the_cause_the_loop_shows(told, bug, part, cause):
    finding = first(told[bug]["findings"])
    assert finding["rule"] == "replicas_differ" and finding["step"] == 1  # from the first step after watch()
    assert finding["evidence"]["part"] == part and cause in finding["message"]
    assert set(finding["parameters"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert max(finding["evidence"]["apart"].values()) > 0.1


def test_the_fixes_suggested_are_those_of_the_cause_shown(told):
    assert "never ddp_model.module" in first(told["unwrapped"]["findings"])["suggestion"]
    assert "before wrapping it in DistributedDataParallel" in first(told["moved"]["findings"])["suggestion"]
    assert "leave model.no_sync()" in first(told["no_sync"]["findings"])["suggestion"]
    assert "load a checkpoint on every rank" in first(told["loaded_on_one_rank"]["findings"])["suggestion"]


def test_a_rank_out_of_step_and_a_loss_nan_on_one_rank_only(told):
    [finding] = told["extra_step"]["findings"]  # not replicas_differ: the readings compared different steps
    assert finding["rule"] == "ranks_out_of_step" and finding["evidence"]["optimizer_steps"] == [9, 10]
    [finding] = told["nan_on_one_rank"]["findings"]
    assert finding["rule"] == "nonfinite_on_some_ranks" and finding["evidence"]["ranks"] == [1]


def test_the_comparison_reads_equal_numbers_as_equal_and_a_missing_gradient_as_different():
    same = [2.0, 3.0]  # the norm of the weights of "w", then of its gradient
    counts = [5.0, 5.0, 3.0, 0.0, 0.0]  # step, optimizer steps, forward passes, skipped, unsynced
    found = facts(["w"], same + [-v for v in same] + counts + [-v for v in counts] + [0.0, 0.0])
    assert found["weights_differ"] == found["gradients_differ"] == 0 and found["optimizer_steps"] == [5, 5]
    apart = [2.0 * (1 + 10 * TOLERANCE), 3.0]
    found = facts(["w"], apart + [-v for v in same] + counts + [-v for v in counts] + [0.0, 1.0])
    assert found["weights_differ"] == 1 and found["gradients_differ"] == 0 and found["nonfinite_ranks"] == [1]
    assert found["apart"]["weights"]["w"] == pytest.approx(10 * TOLERANCE, rel=1e-3)
    missing = [2.0, float("inf")]  # one rank has no gradient (its NaN norm is sent as inf)
    found = facts(["w"], missing + [-v for v in same] + counts + [-v for v in counts] + [0.0, 0.0])
    assert found["gradients_differ"] == 1 and found["apart"]["gradients"]["w"] == float("inf")
