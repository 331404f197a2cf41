"""The offline GLUE metric module (recipes/glue_metrics) against hand-computed cases and plain numpy formulas."""

from pathlib import Path

import evaluate
import numpy as np
import pytest

METRIC = str(Path(__file__).resolve().parents[1] / "recipes" / "glue_metrics")
ACCURACY_TASKS = ["sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans"]


def pearson(x, y):
    x, y = np.asarray(x, float) - np.mean(x), np.asarray(y, float) - np.mean(y)
    return float(np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y)))


def average_ranks(x):
    """1-based ranks; tied values share the mean of their ranks."""
    x = np.asarray(x)
    return (x[:, None] > x[None, :]).sum(1) + ((x[:, None] == x[None, :]).sum(1) + 1) / 2


def reference_metrics(task, predictions, references):
    """GLUE's metrics from their definitions: accuracy, F1 of class 1, Matthews, Pearson, Spearman."""
    p, r = np.asarray(predictions), np.asarray(references)
    if task == "stsb":
        return {"pearson": pearson(p, r), "spearmanr": pearson(average_ranks(p), average_ranks(r))}
    tp, tn = np.sum((p == 1) & (r == 1)), np.sum((p == 0) & (r == 0))
    fp, fn = np.sum((p == 1) & (r == 0)), np.sum((p == 0) & (r == 1))
    if task == "cola":
        denominator = np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
        return {"matthews_correlation": float((tp * tn - fp * fn) / denominator) if denominator else 0.0}
    metrics = {"accuracy": float(np.mean(p == r))}
    if task in ("mrpc", "qqp"):
        metrics["f1"] = float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0
    return metrics


@pytest.mark.parametrize(
    "task, predictions, references, expected",
    [
        ("mrpc", [1, 0, 1], [1, 1, 1], {"accuracy": 2 / 3, "f1": 0.8}),  # tp 2, fn 1: f1 = 4 / 5
        ("qqp", [0, 0, 1, 1], [0, 1, 1, 0], {"accuracy": 0.5, "f1": 0.5}),
        ("cola", [1, 0, 1, 0], [1, 1, 1, 0], {"matthews_correlation": 2 / np.sqrt(12)}),  # (2*1 - 0) / sqrt(2*3*1*2)
        ("cola", [1, 1, 1, 1], [1, 0, 1, 0], {"matthews_correlation": 0.0}),  # one predicted class: defined as 0
        ("stsb", [1.0, 2.0, 3.0], [2.0, 4.0, 6.0], {"pearson": 1.0, "spearmanr": 1.0}),
        ("stsb", [1.0, 2.0, 3.0], [3.0, 1.0, 2.0], {"pearson": -0.5, "spearmanr": -0.5}),
        ("rte", [0, 1, 1, 1], [0, 1, 0, 1], {"accuracy": 0.75}),
    ],
)
def test_hand_computed_cases(task, predictions, references, expected):
    result = evaluate.load(METRIC, task).compute(predictions=predictions, references=references)
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6)


@pytest.mark.parametrize("task", ["cola", "mrpc", "qqp", "stsb"] + ACCURACY_TASKS)
def test_matches_numpy_formulas_on_random_data(task):
    rng = np.random.default_rng(len(task))
    if task == "stsb":  # rounded scores, so that the Spearman ranks have ties
        references = np.round(rng.uniform(0, 5, 200), 1)
        predictions = np.round(references + rng.normal(0, 1.5, 200), 1)
    else:
        references = rng.integers(0, 3 if task.startswith("mnli") else 2, 200)
        predictions = np.where(rng.random(200) < 0.7, references, rng.integers(0, 2, 200))
    result = evaluate.load(METRIC, task).compute(predictions=predictions, references=references)
    expected = reference_metrics(task, predictions, references)
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-5)
        assert 0.1 < abs(value) < 1  # a real, non-degenerate case


def test_unknown_task_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown GLUE task 'mnli-mm'"):
        evaluate.load(METRIC, "mnli-mm")
